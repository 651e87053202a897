"""stage2.share_prompt (issue 15): one row per pair, [prompt | chosen | rejected], the prompt run once. The losses,
metrics and gradients equal the unshared [chosen rows, rejected rows] batch's, with fewer tokens through the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from pal_jax.config import validate
from pal_jax.core.errors import ConfigError
from pal_jax.model.spec import ModelConfig
from pal_jax.model.transformer import Transformer
from pal_jax.training import stage2

VOCAB = 97
S2 = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", use_dpo=True, sft_weight=1.0, align_weight=0.1,
          align_temperature=0.1, norm_use_reference=True, simpo_gamma=0.0)


def tiny_model(family: str, seed: int) -> Transformer:
    cfg = ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 4, d_ff=64, max_len=128, init_std=0.2)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def pairs(n: int = 7, seed: int = 0) -> stage2.PairEncoded:
    """Random pairs: distinct replies of different lengths, a pair with the same reply on both sides (pair 1), a
    select pair (pair 2) and a one-token prompt (pair 3)."""
    rng = np.random.default_rng(seed)
    prompt, chosen, rejected, head = [], [], [], []
    for i in range(n):
        p = rng.integers(3, VOCAB, 1 if i == 3 else int(rng.integers(8, 40))).tolist()
        c = rng.integers(3, VOCAB, int(rng.integers(2, 12))).tolist()
        j = list(c) if i == 1 else rng.integers(3, VOCAB, int(rng.integers(1, 14))).tolist()
        prompt.append(p), chosen.append(c), rejected.append(j), head.append(min(len(p), 5))
    return stage2.PairEncoded(prompt=prompt, chosen=chosen, rejected=rejected, head_len=head,
                              is_select=[i == 2 for i in range(n)], n_truncated=0, n_dropped=0)


def loss_and_grads(model, ref_model, batch, s2):
    graphdef, state = nnx.split(model, nnx.Param)
    ref_state = nnx.split(ref_model, nnx.Param)[1]
    loss_fn = stage2.make_loss_fn(graphdef, ml_collections.ConfigDict(s2))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def f(s):
        num, den, mets = loss_fn(nnx.merge(graphdef, s), batch, ref_state)
        return num / den, (den, mets)

    (loss, (den, mets)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return float(loss), float(den), {k: float(v) for k, v in mets.items()}, grads


@pytest.mark.parametrize("family,loss_type", [("llama", "sigmoid"), ("gpt2", "sigmoid_norm")])
def test_shared_prompt_loss_metrics_and_gradients_equal_the_unshared_rows(family, loss_type):
    enc = pairs()
    rows = np.array([0, 1, 2, 3, 4, 5, 6, -1])  # -1: a padding pair
    plain = stage2.PairSource(enc, 8, (64, 128), seed=0)
    shared = stage2.PairSource(enc, 8, (64, 128), seed=0, share_prompt=True)
    for s in (plain, shared):
        s.set_pad(0)
    a, b = plain.make_batch(rows), shared.make_batch(rows)
    assert a["inputs"].shape == (16, 64) and b["inputs"].shape[0] == 8
    # fewer tokens through the model: each prompt once, and pair 1 (the same reply twice) has one branch
    assert b["inputs"].size < 0.8 * a["inputs"].size
    assert b["rej_same"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0] and b["rej_weights"][1].sum() == 0
    # each branch's targets are its reply, at positions continuing the prompt's
    for r in range(7):
        P = len(enc.prompt[r])
        for key, reply in (("weights", enc.chosen[r]), ("rej_weights", enc.rejected[r] if r != 1 else [])):
            w = b[key][r] > 0
            assert b["targets"][r][w].tolist() == reply
            assert b["positions"][r][w].tolist() == list(range(P - 1, P - 1 + len(reply)))
    assert plain.batch(3)["inputs"].shape[0] == 2 * shared.batch(3)["inputs"].shape[0]  # the same plan
    s2 = dict(S2, loss_type=loss_type)
    policy, ref = tiny_model(family, 0), tiny_model(family, 1)
    la, da, ma, ga = loss_and_grads(policy, ref, a, s2)
    lb, db, mb, gb = loss_and_grads(policy, ref, b, s2)
    assert da == db == 7.0
    assert abs(la - lb) < 1e-5 * max(1.0, abs(la)), (la, lb)
    assert set(ma) == set(mb) and {"dpo_loss", "chosen_nll", "align_loss"} <= set(ma)
    for k in ma:
        assert abs(ma[k] - mb[k]) < 1e-4 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-4, atol=2e-6)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(ga)) > 1e-3  # real gradients


def test_precomputed_reference_logps_are_the_same_in_both_layouts():
    enc = pairs(6, seed=3)
    model = tiny_model("llama", 2)
    graphdef, state = nnx.split(model, nnx.Param)
    out = []
    for share in (False, True):
        src = stage2.PairSource(enc, 4, (64, 128), seed=0, share_prompt=share)
        src.set_pad(0)
        lp = np.zeros((6, 2), np.float32)
        for rows in src.eval_plan():
            got = np.asarray(jax.jit(stage2._logps)(nnx.merge(graphdef, state), src.make_batch(rows)))
            for r, i in enumerate(rows):
                if i >= 0:
                    lp[i] = got[r]
        out.append(lp)
    assert np.all(out[0] < 0) and out[0][1, 0] == out[0][1, 1]
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5)


def test_share_lengths_grow_past_the_largest_bucket():
    assert stage2.share_lengths((64, 96), 90).tolist() == [64, 96]
    assert stage2.share_lengths((64, 96), 130).tolist() == [64, 96, 112, 128, 144]
    assert stage2.share_lengths((128, 256, 512), 600).tolist() == [128, 256, 512, 576, 640]


def test_share_buckets_change_the_row_length_not_the_plan():
    enc = pairs(40, seed=5)
    default = stage2.PairSource(enc, 4, (32, 64), seed=0, share_prompt=True)
    one = stage2.PairSource(enc, 4, (32, 64), seed=0, share_prompt=True, share_buckets=(56,))
    longest = int(default.shared_len.max())
    assert 32 < longest <= 56 and one.share_buckets.tolist() == [56]
    lengths = set()
    for step in range(default.steps_per_epoch):
        a, b = default.batch(step), one.batch(step)
        np.testing.assert_array_equal(a["targets"][a["weights"] > 0], b["targets"][b["weights"] > 0])
        lengths.add(a["inputs"].shape[1])
        assert b["inputs"].shape[1] == 56
    assert len(lengths) >= 2  # the default ladder: several compiled lengths
    with pytest.raises(ConfigError, match=r"stage2\.share_buckets = \(96, 64\)"):
        validate(tiny_config(stage2__share_buckets=(96, 64)))


def test_share_prompt_is_refused_with_splash_or_a_sliding_window():
    with pytest.raises(ConfigError, match=r"stage2\.share_prompt.*splash"):
        validate(tiny_config(stage2__share_prompt=True, model__attention="splash"))
    with pytest.raises(ConfigError, match=r"stage2\.share_prompt.*sliding window"):
        validate(tiny_config(stage2__share_prompt=True, model__sliding_window=16))
    validate(tiny_config(stage2__share_prompt=True))


def row_and_flat_batches(groups: int):
    """(pairs, their shared batch with the row window, with the flat window of `groups` groups): 7 pairs and a padding
    pair; pair 0 has one long reply, so the row window is mostly padding on the other rows."""
    enc = pairs()
    enc.chosen[0] = list(range(3, 43))
    rows = np.array([0, 1, 2, 3, 4, 5, 6, -1])
    out = []
    for flat_groups in (0, groups):
        src = stage2.PairSource(enc, 8, (64, 128), seed=0, share_prompt=True, flat_groups=flat_groups)
        src.set_pad(0)
        out.append(src.make_batch(rows))
    return enc, *out


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_flat_window_lists_each_groups_reply_positions_once(groups):
    """stage2.flat_window: each group of 8 / groups rows lists its reply positions (chosen and rejected) once, in
    row order, within its own rows, narrower than the per-row window; the rest is weight-0 padding."""
    enc, a, b = row_and_flat_batches(groups)
    group, width, L = 8 // groups, b["win_idx"].shape[1], b["inputs"].shape[1]
    need = [len(enc.chosen[i]) + (0 if i == 1 else len(enc.rejected[i])) for i in range(7)] + [0]
    fullest = max(sum(need[g * group:(g + 1) * group]) for g in range(groups))
    assert width == max(8, -(-(-(-fullest // group)) // 8) * 8) < a["win_idx"].shape[1]
    assert b["win_group"].tolist() == [list(range(g * group, (g + 1) * group))
                                       for g in range(groups) for _ in range(group)]
    for g in range(groups):
        sl = slice(g * group, (g + 1) * group)
        idx, row = b["win_idx"][sl].reshape(-1), b["win_row"][sl].reshape(-1)
        for key, wkey in (("weights", "win_weights"), ("rej_weights", "win_rej_weights")):
            w = b[wkey][sl].reshape(-1)
            on = np.flatnonzero(w)
            expect = np.flatnonzero(b[key][sl].reshape(-1))  # row-major positions within the group's rows
            np.testing.assert_array_equal(idx[on], expect)
            np.testing.assert_array_equal(row[on], expect // L)
            np.testing.assert_array_equal(b["win_targets"][sl].reshape(-1)[on], b["targets"][sl].reshape(-1)[expect])
        real = (b["win_weights"][sl] + b["win_rej_weights"][sl]).reshape(-1) > 0
        assert real.sum() == sum(need[sl]) and not real[real.sum():].any()  # listed first, then padding
    assert {k: v.shape for k, v in b.items() if not k.startswith("win_")} == \
        {k: v.shape for k, v in a.items() if not k.startswith("win_")}


@pytest.mark.parametrize("groups", [1, 4])
def test_flat_window_loss_metrics_and_gradients_equal_the_row_window(groups):
    _, a, b = row_and_flat_batches(groups)
    policy, ref = tiny_model("llama", 0), tiny_model("llama", 1)
    la, da, ma, ga = loss_and_grads(policy, ref, a, S2)
    lb, db, mb, gb = loss_and_grads(policy, ref, b, S2)
    assert da == db == 7.0
    assert abs(la - lb) < 1e-5 * max(1.0, abs(la)), (la, lb)
    assert set(ma) == set(mb)
    for k in ma:
        assert abs(ma[k] - mb[k]) < 1e-4 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-4, atol=2e-6)
    graphdef, state = nnx.split(policy, nnx.Param)
    lp_a = np.asarray(jax.jit(stage2._logps)(nnx.merge(graphdef, state), a))
    lp_b = np.asarray(jax.jit(stage2._logps)(nnx.merge(graphdef, state), b))
    assert np.all(lp_a[:7] < -1.0) and lp_a[1, 0] == lp_a[1, 1]
    np.testing.assert_allclose(lp_b, lp_a, rtol=1e-5, atol=1e-5)


def test_flat_window_is_refused_without_whole_groups():
    enc = pairs()
    with pytest.raises(ValueError, match="flat_groups = 3"):
        stage2.PairSource(enc, 8, (64, 128), seed=0, share_prompt=True, flat_groups=3)
    with pytest.raises(ValueError, match="flat_groups = 2 with share_prompt False"):
        stage2.PairSource(enc, 8, (64, 128), seed=0, flat_groups=2)
    src = stage2.PairSource(enc, 8, (64, 128), seed=0, share_prompt=True, flat_groups=2)
    src.set_pad(0)
    assert src.make_batch(np.arange(8) % 7, out=np.arange(4, 8))["win_group"][0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="expected whole groups of 4"):
        src.make_batch(np.arange(8) % 7, out=np.arange(2, 6))


def test_flat_window_config_needs_shared_rows_and_no_micro_batches():
    validate(tiny_config(stage2__share_prompt=True, stage2__flat_window=True))
    with pytest.raises(ConfigError, match=r"stage2\.flat_window = True: expected False unless stage2\.share_prompt"):
        validate(tiny_config(stage2__flat_window=True))
    with pytest.raises(ConfigError, match=r"they are True and 2"):
        validate(tiny_config(stage2__share_prompt=True, stage2__flat_window=True, train__grad_accum=2))
