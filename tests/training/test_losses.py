"""Unit tests for the DPO and persona-embedding alignment losses in pal_jax/training/losses.py (NumPy references).

Compilation dominates the run time, so nearly every call goes through a few module-level jitted entry points
(each bundling a loss, its sums and its gradient) with fixed shapes (B = 8 pairs; [8, 32] embeddings) and the
scalars passed as arguments: each compiles once.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pal_jax.training import losses as L

B, D = 8, 32


def _dpo_all(pc, pr, rc, rr, beta, ls):
    """(loss, metrics) of dpo_loss and its gradient w.r.t. the four log-prob vectors, in one compilation."""
    loss_fn = lambda *logps: L.dpo_loss(*logps, beta, ls)[0]  # noqa: E731
    return L.dpo_loss(pc, pr, rc, rr, beta, ls), jax.grad(loss_fn, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)


def _align_all(persona, response, temperature, valid):
    """(loss, metrics), the sums, and the gradient w.r.t. (persona, response), in one compilation."""
    loss_fn = lambda p, r: L.embedding_alignment_loss(p, r, temperature, valid)[0]  # noqa: E731
    return (L.embedding_alignment_loss(persona, response, temperature, valid),
            L.embedding_alignment_sums(persona, response, temperature, valid),
            jax.grad(loss_fn, argnums=(0, 1))(persona, response))


dpo_all = jax.jit(_dpo_all)
dpo_loss = lambda *args: dpo_all(*args)[0]  # noqa: E731
dpo_grad = lambda *args: dpo_all(*args)[1]  # noqa: E731
dpo_loss_sums = jax.jit(L.dpo_loss_sums)
pooled_embeddings = jax.jit(L.pooled_embeddings)
align_all = jax.jit(_align_all)
align_loss = lambda *args: align_all(*args)[0]  # noqa: E731
align_sums = lambda *args: align_all(*args)[1]  # noqa: E731
align_grad = lambda *args: align_all(*args)[2]  # noqa: E731
ALL_VALID = np.ones(B, bool)


# ------------------------------------------------------------------------------------------ NumPy references
def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, beta, ls):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    logits = rew_c - rew_r
    loss = np.mean(-(1 - ls) * _np_log_sigmoid(logits) - ls * _np_log_sigmoid(-logits))
    return loss, {
        "rewards_chosen": rew_c.mean(),
        "rewards_rejected": rew_r.mean(),
        "reward_margin": (rew_c - rew_r).mean(),
        "reward_accuracy": np.mean(rew_c > rew_r),
        "logps_chosen": pc.mean(),
        "logps_rejected": pr.mean(),
    }


def _np_infonce(persona, response, temperature, valid):
    """InfoNCE on the valid rows only (masked rows simply dropped), float64."""
    idx = np.flatnonzero(np.asarray(valid, bool))
    p = np.asarray(persona, np.float64)[idx]
    r = np.asarray(response, np.float64)[idx]
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    r /= np.linalg.norm(r, axis=-1, keepdims=True)
    cos = r @ p.T
    logits = cos / temperature
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    n = len(idx)
    return -np.mean(np.diag(logp)), {
        "align_accuracy": np.mean(logits.argmax(-1) == np.arange(n)),
        "align_pos_cos": np.mean(np.diag(cos)),
        "align_neg_cos": cos[~np.eye(n, dtype=bool)].mean(),
    }


def _random_logps(seed):
    # Summed response log-probs of realistic size, float32 so that both sides see identical inputs.
    rng = np.random.default_rng(seed)
    return [rng.uniform(-60.0, -5.0, size=B).astype(np.float32) for _ in range(4)]


def _embs(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(B, D)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- DPO
def test_dpo_policy_equals_reference_gives_log2():
    pc, pr, _, _ = _random_logps(0)
    for beta in (0.01, 0.1, 1.0, 5.0):
        for ls in (0.0, 0.1):
            loss, m = dpo_loss(pc, pr, pc, pr, beta, ls)
            assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
            assert float(m["reward_margin"]) == 0.0
            assert float(m["reward_accuracy"]) == 0.0
            assert float(m["rewards_chosen"]) == 0.0 and float(m["rewards_rejected"]) == 0.0


def test_dpo_matches_numpy():
    for seed, beta in enumerate((0.05, 0.1, 0.5, 2.0)):
        pc, pr, rc, rr = _random_logps(10 + seed)
        for ls in (0.0, 0.1):
            loss, m = dpo_loss(pc, pr, rc, rr, beta, ls)
            ref_loss, ref_m = _np_dpo(pc, pr, rc, rr, beta, ls)
            np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
            assert set(m) == set(ref_m)
            for k in ref_m:  # atol: the margins are differences of float32 rewards of size up to beta * 55
                np.testing.assert_allclose(float(m[k]), ref_m[k], rtol=1e-6, atol=1e-6 * max(1.0, beta * 55),
                                           err_msg=f"{k} beta={beta} ls={ls}")
    # label_smoothing defaults to 0 (plain DPO); checked on the signature to save a compilation.
    assert inspect.signature(L.dpo_loss).parameters["label_smoothing"].default == 0.0
    assert inspect.signature(L.dpo_loss_sums).parameters["label_smoothing"].default == 0.0


def test_ipo_matches_its_formula_in_numpy():
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2, h the log-ratio margin; minimal where h = 1/(2 tau)."""
    for seed, beta in enumerate((0.1, 0.5, 2.0)):
        pc, pr, rc, rr = _random_logps(30 + seed)
        h = (np.float64(pc) - rc) - (np.float64(pr) - rr)
        want = np.mean((h - 1 / (2 * beta)) ** 2)
        loss, m = L.dpo_loss(pc, pr, rc, rr, beta, 0.0, "ipo")
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        np.testing.assert_allclose(float(m["reward_margin"]), beta * h.mean(), rtol=1e-5, atol=1e-5)
    pc, pr, _, _ = _random_logps(3)
    zero = np.zeros_like(pc)  # reference 0, chosen 1, rejected 0: h = 1 = 1/(2 tau) at tau 0.5, the minimum
    loss, _ = L.dpo_loss(zero + 1.0, zero, zero, zero, 0.5, 0.0, "ipo")
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="stage2.loss_type = 'kto'"):
        L.dpo_loss(pc, pr, pc, pr, 0.1, 0.0, "kto")


def test_dpo_sums_add_up_over_micro_batches():
    pc, pr, rc, rr = _random_logps(1)
    loss, m = dpo_loss(pc, pr, rc, rr, 0.1, 0.1)
    tot, n, sums = 0.0, 0.0, {}
    for sl in (slice(0, B // 2), slice(B // 2, B)):
        s, c, ms = dpo_loss_sums(pc[sl], pr[sl], rc[sl], rr[sl], 0.1, 0.1)
        tot, n = tot + s, n + c
        sums = {k: sums.get(k, 0.0) + v for k, v in ms.items()}
    assert float(n) == B
    np.testing.assert_allclose(float(tot / n), float(loss), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(sums[k] / n), float(m[k]), rtol=1e-6, atol=1e-6)


def test_dpo_gradient_matches_analytic():
    pc, pr, rc, rr = _random_logps(2)
    beta = 0.3
    g_c, g_r, _, _ = dpo_grad(pc, pr, rc, rr, beta, 0.0)
    logits = beta * ((np.float64(pc) - rc) - (np.float64(pr) - rr))
    expected = -beta / (1.0 + np.exp(logits)) / B  # d loss / d pc = -beta * sigmoid(-logits) / B
    assert np.all(np.abs(np.asarray(g_c)) > 0)
    np.testing.assert_allclose(np.asarray(g_c), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_r), -expected, rtol=1e-5)


def test_dpo_reference_behind_stop_gradient_gets_no_gradient():
    pc, pr, rc, rr = _random_logps(3)

    def train_loss(pol, ref):
        return L.dpo_loss(pol[0], pol[1], jax.lax.stop_gradient(ref[0]), jax.lax.stop_gradient(ref[1]), 0.1)[0]

    g_pol, g_ref = jax.jit(jax.grad(train_loss, argnums=(0, 1)))((pc, pr), (rc, rr))
    assert np.all(np.asarray(g_ref[0]) == 0.0) and np.all(np.asarray(g_ref[1]) == 0.0)
    assert np.all(np.asarray(g_pol[0]) != 0.0) and np.all(np.asarray(g_pol[1]) != 0.0)


def test_dpo_finite_for_huge_margins():
    z = np.zeros(B, np.float32)
    for ls in (0.0, 0.1):
        for sign in (1.0, -1.0):
            pc = np.full(B, sign * 1e4, np.float32)
            loss, m = dpo_loss(pc, z, z, z, 1.0, ls)
            grads = dpo_grad(pc, z, z, z, 1.0, ls)
            assert np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
            assert all(np.isfinite(float(v)) for v in m.values())
    # Hugely right with ls = 0: the loss vanishes; hugely wrong: it grows linearly (beta * 1e4).
    assert float(dpo_loss(np.full(B, 1e4, np.float32), z, z, z, 1.0, 0.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(dpo_loss(np.full(B, -1e4, np.float32), z, z, z, 1.0, 0.0)[0]) == pytest.approx(1e4, rel=1e-6)


# ------------------------------------------------------------------------------------------- pooled embeddings
def test_pooled_embeddings_matches_numpy_and_ignores_masked_positions():
    rng = np.random.default_rng(4)
    t, d = 6, 5
    hidden = rng.normal(size=(4, t, d)).astype(np.float32)
    mask = rng.random((4, t)) < 0.6
    mask[0] = [1, 0, 0, 0, 0, 0]
    mask[1] = False  # all-zero row
    mask[2] = True
    emb = np.asarray(pooled_embeddings(hidden, mask))
    assert emb.dtype == np.float32 and emb.shape == (4, d) and np.all(np.isfinite(emb))
    for i in range(4):
        expected = hidden[i][mask[i]].mean(0) if mask[i].any() else np.zeros(d)
        np.testing.assert_allclose(emb[i], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb[1], 0.0)

    # Garbage (even inf/NaN) at masked positions changes nothing; a float 0/1 mask gives the same result.
    changed = hidden.copy()
    changed[~mask] = 1e3
    changed[1, 0, 0] = np.nan
    changed[0, 3, 1] = np.inf
    np.testing.assert_array_equal(np.asarray(pooled_embeddings(changed, mask)), emb)
    np.testing.assert_array_equal(np.asarray(pooled_embeddings(changed, mask.astype(np.float32))), emb)
    # bf16 activations are pooled in float32.
    emb_bf16 = np.asarray(pooled_embeddings(jnp.asarray(hidden, jnp.bfloat16), mask))
    assert emb_bf16.dtype == np.float32
    np.testing.assert_allclose(emb_bf16, emb, atol=2e-2)


# ---------------------------------------------------------------------------------------- embedding alignment
def test_alignment_matches_numpy():
    persona, response = _embs(5)
    response[:3] += 2.0 * persona[:3]  # some rows aligned, so the accuracy is neither 0 nor 1
    for temperature in (0.05, 0.1, 1.0):
        loss, m = align_loss(persona, response, temperature, ALL_VALID)
        ref_loss, ref_m = _np_infonce(persona, response, temperature, ALL_VALID)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
        assert set(m) == set(ref_m)
        for k in ref_m:
            np.testing.assert_allclose(float(m[k]), ref_m[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} t={temperature}")
    assert 0.0 < float(m["align_accuracy"]) < 1.0
    # valid=None (the default) means all rows valid.
    assert inspect.signature(L.embedding_alignment_loss).parameters["valid"].default is None
    np.testing.assert_allclose(float(jax.jit(L.embedding_alignment_loss)(persona, response, 1.0)[0]), ref_loss, rtol=1e-5)


def test_alignment_valid_mask_matches_numpy_and_ignores_masked_rows():
    persona, response = _embs(6)
    valid = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    loss, m = align_loss(persona, response, 0.1, valid)
    ref_loss, ref_m = _np_infonce(persona, response, 0.1, valid)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for k in ref_m:
        np.testing.assert_allclose(float(m[k]), ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # Changing (even zeroing) the masked rows changes neither the loss nor the metrics.
    p2, r2 = persona.copy(), response.copy()
    p2[2], r2[2] = 100.0 * r2[3], 0.0  # a masked persona that would be a strong negative for row 3
    p2[5], r2[5] = 0.0, -7.0
    loss2, m2 = align_loss(p2, r2, 0.1, valid)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(m2[k]), float(m[k]), rtol=1e-6, atol=1e-7)
    # ...and the masked rows get exactly zero gradient.
    for g in align_grad(p2, r2, 0.1, valid):
        assert np.all(np.asarray(g)[~valid] == 0.0) and np.all(np.isfinite(np.asarray(g)))

    # Sums are over valid rows: count = number of valid rows, sum = mean * count.
    s, n, ms = align_sums(persona, response, 0.1, valid)
    assert float(n) == valid.sum()
    np.testing.assert_allclose(float(s / n), float(loss), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(float(ms[k] / n), float(m[k]), rtol=1e-6, atol=1e-7)


def test_alignment_loss_falls_as_responses_move_to_their_personas():
    persona, response = _embs(7)
    losses = [float(align_loss(persona, (1 - a) * response + a * persona, 0.1, ALL_VALID)[0])
              for a in np.linspace(0.0, 1.0, 11, dtype=np.float32)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.01 < 1.0 < losses[0]


def test_alignment_gradient_descent_lowers_loss():
    persona, response = _embs(8)
    r = jnp.asarray(response)
    losses = [float(align_loss(persona, r, 0.1, ALL_VALID)[0])]
    for _ in range(5):
        r = r - 1.0 * align_grad(persona, r, 0.1, ALL_VALID)[1]
        losses.append(float(align_loss(persona, r, 0.1, ALL_VALID)[0]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]


def test_alignment_zero_rows_are_finite():
    persona, response = _embs(9)
    response[1] = 0.0
    persona[2] = 0.0
    loss, m = align_loss(persona, response, 0.1, ALL_VALID)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert all(np.all(np.isfinite(np.asarray(g))) for g in align_grad(persona, response, 0.1, ALL_VALID))
    # No valid row at all: zeros, not NaN.
    loss0, m0 = align_loss(persona, response, 0.1, np.zeros(B, bool))
    assert float(loss0) == 0.0 and all(float(v) == 0.0 for v in m0.values())


def test_dpo_valid_mask_drops_padding_pairs():
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(4))
    valid = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    s, n, m = L.dpo_loss_sums(pc, pr, rc, rr, 0.3, valid=valid)
    s4, n4, m4 = L.dpo_loss_sums(pc[:4], pr[:4], rc[:4], rr[:4], 0.3)
    assert float(n) == 4.0 == float(n4)
    np.testing.assert_allclose(float(s), float(s4), rtol=1e-6)
    for k in m4:
        np.testing.assert_allclose(float(m[k]), float(m4[k]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ the stage2.loss_type variants
# One compilation per (loss_type, norm_use_reference): the formulas are checked on random inputs against NumPy
# in float64, written from the papers (not from the implementation), with padding pairs (valid 0, zero tokens).
dpo_sums_typed = jax.jit(L.dpo_loss_sums, static_argnames=("loss_type", "norm_use_reference"))


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _variant_inputs(seed):
    """Policy log-probs, references that differ from them by a few nats (so beta * h takes both signs), token
    counts and a valid mask whose last two pairs are padding (zero tokens, as stage2's padding rows have)."""
    rng = np.random.default_rng(seed)
    pc, pr = (rng.uniform(-60.0, -5.0, size=B).astype(np.float32) for _ in range(2))
    rc = (pc + rng.normal(0.0, 3.0, size=B)).astype(np.float32)
    rr = (pr + rng.normal(0.0, 3.0, size=B)).astype(np.float32)
    nc, nr = (rng.integers(1, 40, size=B).astype(np.float32) for _ in range(2))
    valid = np.ones(B, np.float32)
    valid[-2:] = 0.0
    nc[-2:] = nr[-2:] = 0.0
    return pc, pr, rc, rr, nc, nr, valid


def _numpy_per_pair(name, pc, pr, rc, rr, nc, nr, beta, ls, use_ref, gamma):
    pc, pr, rc, rr = (np.float64(x) for x in (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    if name == "sigmoid":  # DPO with conservative label smoothing
        return -(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h)
    if name == "ipo":  # Azar et al. 2023, eq. 17
        return (h - 1 / (2 * beta)) ** 2
    if name == "hinge":  # SLiC
        return np.maximum(0.0, 1 - beta * h)
    if name == "robust":  # Ray Chowdhury et al. 2024
        return ((1 - ls) * -_logsig(beta * h) - ls * -_logsig(-beta * h)) / (1 - 2 * ls)
    if name == "sigmoid_norm":  # length-normalised DPO; SimPO without the reference
        nc, nr = np.maximum(nc, 1.0), np.maximum(nr, 1.0)
        hn = (pc - rc) / nc - (pr - rr) / nr if use_ref else pc / nc - pr / nr
        z = beta * hn - gamma
        return -(1 - ls) * _logsig(z) - ls * _logsig(-z)
    if name == "apo_zero":  # D'Oosterlinck et al. 2024
        return (1 - _sig(beta * (pc - rc))) + _sig(beta * (pr - rr))
    raise AssertionError(name)


VARIANT_CASES = [(name, True) for name in L.DPO_LOSS_TYPES] + [("sigmoid_norm", False)]


@pytest.mark.parametrize("name,use_ref", VARIANT_CASES)
def test_each_loss_type_matches_its_published_formula_in_numpy(name, use_ref):
    for seed, (beta, ls, gamma) in enumerate(((0.1, 0.0, 0.0), (0.5, 0.1, 0.3), (2.0, 0.3, 1.0))):
        pc, pr, rc, rr, nc, nr, valid = _variant_inputs(100 + seed)
        s, n, m = dpo_sums_typed(pc, pr, rc, rr, beta, ls, valid=valid, loss_type=name, chosen_tokens=nc,
                                 rejected_tokens=nr, norm_use_reference=use_ref, gamma=gamma)
        want = _numpy_per_pair(name, pc, pr, rc, rr, nc, nr, beta, ls, use_ref, gamma)
        assert float(n) == valid.sum()
        np.testing.assert_allclose(float(s), np.sum(want * valid), rtol=2e-5, atol=1e-5)
        # the logged metrics are the DPO ones whatever the loss type
        r_c, r_r = beta * (np.float64(pc) - rc), beta * (np.float64(pr) - rr)
        np.testing.assert_allclose(float(m["reward_margin"]), np.sum((r_c - r_r) * valid), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(float(m["rewards_chosen"]), np.sum(r_c * valid), rtol=1e-5, atol=1e-4)
        assert float(m["reward_accuracy"]) == np.sum((r_c > r_r) * valid)
    if name == "sigmoid_norm" and not use_ref:  # SimPO: the reference does not enter the loss
        s2, _, _ = dpo_sums_typed(pc, pr, rc + 7.0, rr - 3.0, beta, ls, valid=valid, loss_type=name,
                                  chosen_tokens=nc, rejected_tokens=nr, norm_use_reference=False, gamma=gamma)
        np.testing.assert_allclose(float(s2), float(s), rtol=1e-6)


def test_loss_type_list_is_the_weighted_sum_of_its_terms():
    pc, pr, rc, rr, nc, nr, valid = _variant_inputs(7)
    kw = dict(valid=valid, chosen_tokens=nc, rejected_tokens=nr, norm_use_reference=True, gamma=0.2)
    spec = "sigmoid:1.0, ipo:0.5,sigmoid_norm:0.25,apo_zero"
    s, n, m = dpo_sums_typed(pc, pr, rc, rr, 0.5, 0.1, loss_type=spec, **kw)
    parts = {name: dpo_sums_typed(pc, pr, rc, rr, 0.5, 0.1, loss_type=name, **kw) for name in
             ("sigmoid", "ipo", "sigmoid_norm", "apo_zero")}
    want = sum(w * float(parts[name][0]) for name, w in (("sigmoid", 1.0), ("ipo", 0.5), ("sigmoid_norm", 0.25),
                                                         ("apo_zero", 1.0)))
    np.testing.assert_allclose(float(s), want, rtol=1e-5)
    assert float(n) == float(parts["ipo"][1])
    for k, v in m.items():  # the metrics do not depend on the loss type
        np.testing.assert_allclose(float(v), float(parts["ipo"][2][k]), rtol=1e-6)


def test_loss_type_syntax_is_parsed_and_bad_entries_are_named():
    assert L.parse_loss_type("ipo") == (("ipo", 1.0),)
    assert L.parse_loss_type(" sigmoid : 2 ,ipo:0.5") == (("sigmoid", 2.0), ("ipo", 0.5))
    assert L.parse_loss_type((("hinge", 0.5),)) == (("hinge", 0.5),)
    for bad, entry in (("kto", "kto"), ("sigmoid,,ipo", ""), ("sigmoid:0", "sigmoid:0"), ("ipo:-1", "ipo:-1"),
                       ("ipo:nan", "ipo:nan"), ("ipo:inf", "ipo:inf"), ("ipo:x", "ipo:x"), ("ipo,ipo:2", "ipo:2"),
                       ("", ""), ("sigmoid;ipo", "sigmoid;ipo")):
        with pytest.raises(ValueError, match=r"config\.stage2\.loss_type = .*: expected one of .*bad entry "
                                             + repr(entry).replace("(", r"\(")):
            L.parse_loss_type(bad)
    with pytest.raises(ValueError, match="sigmoid_norm.*token counts"):
        L.dpo_loss_sums(*_random_logps(0), 0.1, loss_type="sigmoid_norm")
