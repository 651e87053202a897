"""Sequence packing for Stage 1 (data.packing, pipeline.PackedBatchSource): several examples per row, attention
inside each example, positions restarting at 0, and the same loss, gradients and logits as the examples unpacked."""
from __future__ import annotations

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from pal_jax.training import stage1
from pal_jax.training import loop as train
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.data import pipeline
from pal_jax.training.experiment import Experiment
from pal_jax.model.transformer import ModelConfig, Transformer

VOCAB = 97
BUCKETS = (32, 64)


def random_encoded(n: int, seed: int = 0, persona_weight: float | None = 2.5) -> pipeline.Encoded:
    """n examples of 6..40 ids (prompt 3..len-2, the rest target + eos), mixed tasks; with persona_weight, some
    target tokens weighted (as encode_examples does with data.persona_weight)."""
    rng = np.random.default_rng(seed)
    ids, plen, weights = [], [], []
    for _ in range(n):
        k = int(rng.integers(6, 41))
        ids.append(rng.integers(1, VOCAB, size=k).astype(np.int32))
        p = int(rng.integers(3, k - 1))
        plen.append(p)
        w = np.ones(k - p, np.float32)
        w[rng.random(k - p) < 0.3] = persona_weight or 1.0
        weights.append(w)
    return pipeline.Encoded(ids=ids, prompt_len=plen, task=rng.integers(0, 2, size=n).astype(np.int32),
                            n_truncated=0, n_dropped=0, pad_id=0, index=np.arange(n),
                            target_weights=weights if persona_weight else None)


def tiny_model(family: str) -> Transformer:
    cfg = ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 4, d_ff=64, max_len=64, init_std=0.2)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def loss_and_grads(model, batch):
    """(mean loss, per-task mean losses, gradients of the mean loss) as the train step computes them."""
    graphdef, state = nnx.split(model, nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def f(s):
        num, den, mets = stage1.sft_loss_fn(nnx.merge(graphdef, s), batch, None)
        return num / den, (den, mets)

    (loss, (den, mets)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return float(loss), {k: float(v / den) for k, v in mets.items()}, grads


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # gpt2: slow (suite time)
def test_packed_loss_and_gradients_equal_unpacked(family):
    enc = random_encoded(12)
    unpacked = pipeline.BatchSource(enc, 12, BUCKETS, seed=0).make_batch(np.arange(12))
    src = pipeline.PackedBatchSource(enc, 4, BUCKETS, seed=0)
    rows = src.packed_rows(np.arange(12))
    assert len(rows) < 12 and max(len(r) for r in rows) >= 2  # really packed: fewer rows than examples
    packed = src.make_batch(rows)
    assert packed["inputs"].size < unpacked["inputs"].size
    assert packed["win_weights"].sum() == pytest.approx(unpacked["win_weights"].sum())
    model = tiny_model(family)
    loss_u, mets_u, g_u = loss_and_grads(model, unpacked)
    loss_p, mets_p, g_p = loss_and_grads(model, packed)
    assert 3.0 < loss_u < 6.0  # a real loss (log 97 = 4.57 at random init)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    for k in ("select_loss", "generate_loss"):
        assert mets_u[k] > 0 and mets_p[k] == pytest.approx(mets_u[k], abs=1e-5)
    leaves_u, leaves_p = jax.tree.leaves(g_u), jax.tree.leaves(g_p)
    assert len(leaves_u) == len(leaves_p)
    gmax = max(float(jnp.max(jnp.abs(g))) for g in leaves_u)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves_u, leaves_p))
    assert gmax > 1e-3 and diff < 1e-5, (gmax, diff)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # gpt2: slow (suite time)
def test_packed_row_logits_equal_each_example_alone(family):
    enc = random_encoded(12, seed=1)
    src = pipeline.PackedBatchSource(enc, 4, BUCKETS, seed=0)
    rows = src.packed_rows(np.arange(12))
    batch = src.make_batch(rows)
    model = tiny_model(family)
    logits, _ = model(jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]),
                      segment_ids=jnp.asarray(batch["segment_ids"]))
    # each example alone in its own row (positions 0.., padding after it, which the causal mask keeps out)
    alone_in = np.zeros((12, 64), np.int32)
    for i, ids in enumerate(enc.ids):
        alone_in[i, :len(ids) - 1] = ids[:-1]
    alone, _ = model(jnp.asarray(alone_in))
    later = next(int(r[-1]) for r in rows if len(r) > 1)  # and one, the last segment of its row, with no padding
    exact, _ = model(jnp.asarray(enc.ids[later][None, :-1]))
    np.testing.assert_allclose(np.asarray(alone[later, :len(enc.ids[later]) - 1]), np.asarray(exact[0]), atol=1e-5,
                               rtol=0)
    checked = 0
    for r, row in enumerate(rows):
        off = 0
        for seg, i in enumerate(row, start=1):
            n = len(enc.ids[i]) - 1
            assert (batch["segment_ids"][r, off:off + n] == seg).all()
            assert (batch["positions"][r, off:off + n] == np.arange(n)).all()  # positions restart at 0
            np.testing.assert_allclose(np.asarray(logits[r, off:off + n]), np.asarray(alone[i, :n]), atol=1e-5,
                                       rtol=0)
            off += n
            checked += seg > 1  # a segment after another one: it saw none of the row's earlier tokens
        assert (batch["segment_ids"][r, off:] == 0).all()  # padding
    assert checked >= 3
    # without the segment mask the later segments do change: the mask is what keeps them apart
    mixed, _ = model(jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]))
    assert float(jnp.max(jnp.abs(mixed - logits))) > 1e-3


def test_pack_first_fit_in_order_within_windows():
    lengths = np.asarray([50, 30, 20, 40, 10, 60, 5])
    targets = np.asarray([5, 5, 5, 5, 5, 5, 5])
    rows = pipeline.pack(np.arange(7), lengths, targets, capacity=64, target_cap=64)
    # 50 -> row 0 (14 left); 30 -> row 1; 20 -> row 1 (14 left); 40 -> row 2; 10 -> row 0 (4 left); 60 -> row 3;
    # 5 -> row 1, the first with room
    assert [r.tolist() for r in rows] == [[0, 4], [1, 2, 6], [3], [5]]
    # the target cap closes a row for targets: 3 target tokens per row at most
    rows = pipeline.pack(np.arange(4), np.full(4, 10), np.asarray([2, 2, 1, 1]), capacity=64, target_cap=3)
    assert [r.tolist() for r in rows] == [[0, 2], [1, 3]]
    # windows of 2 examples: rows never take examples of a later window
    rows = pipeline.pack(np.arange(4), np.full(4, 10), np.ones(4, np.int64), capacity=64, target_cap=64, window=2)
    assert [r.tolist() for r in rows] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="capacity"):
        pipeline.pack(np.arange(1), np.asarray([65]), np.asarray([1]), capacity=64, target_cap=64)


def test_packed_source_deterministic_resumable_and_covers_each_epoch():
    n, B = 200, 4
    enc = random_encoded(n, seed=2, persona_weight=None)
    a = pipeline.PackedBatchSource(enc, B, BUCKETS, seed=7, select_ratio=0.5)
    lengths = np.asarray([len(x) - 1 for x in enc.ids])
    steps = [a.batch(s) for s in range(3 * a.steps_per_epoch)]
    counts = [a._counts[e] for e in range(3)]
    assert sum(counts) >= 3 * a.steps_per_epoch - 3 and a.steps_per_epoch < a.epoch_size // B  # packed: fewer steps
    assert a.target_cap >= a.unpacked_window  # every example fits a row alone
    # a fresh source (a resumed run) asked for a step of epoch 2 gives the same batch
    b = pipeline.PackedBatchSource(enc, B, BUCKETS, seed=7, select_ratio=0.5)
    s = counts[0] + counts[1] + 1
    for k, v in b.batch(s).items():
        np.testing.assert_array_equal(v, steps[s][k], err_msg=k)
    # another seed, another order
    c = pipeline.PackedBatchSource(enc, B, BUCKETS, seed=8, select_ratio=0.5)
    assert not np.array_equal(c.batch(0)["inputs"], steps[0]["inputs"])
    for epoch in range(2):
        expected = a.epoch_rows(epoch)
        seen = np.concatenate([np.concatenate(batch) for batch in a.epoch_batches(epoch)])
        left_out = len(expected) - len(seen)
        assert 0 <= left_out < B * 6  # only the last < B packed rows of the epoch are left out
        assert sorted(np.concatenate([seen, np.setdiff1d(expected, seen)]).tolist()) == sorted(set(expected))
        for batch in a.epoch_batches(epoch):
            total = [int(lengths[r].sum()) for r in batch]
            assert max(total) <= 64
            # the smallest bucket that fits the batch's longest row
            L = a.make_batch(batch)["inputs"].shape[1]
            assert L == (32 if max(total) <= 32 else 64)
    # multi-host: a process's rows equal those rows of the global batch
    full = a.batch(5)
    part = a.batch(5, rows_of=lambda n_rows: np.arange(n_rows)[2:])
    for k, v in part.items():
        np.testing.assert_array_equal(v, full[k][2:], err_msg=k)


def test_packed_eval_covers_every_example_once():
    enc = random_encoded(50, seed=3)
    src = pipeline.PackedBatchSource(enc, 4, BUCKETS, seed=0)
    plan = src.eval_plan()
    got = np.concatenate([r for batch in plan for r in batch])
    assert sorted(got.tolist()) == list(range(50))
    batches = list(src.eval_batches())
    assert len(batches) == len(plan) < 50 // 4
    assert sum(b["win_weights"].sum() for b in batches) == pytest.approx(sum(w.sum() for w in enc.target_weights))


def test_compile_mode_builds_the_packed_batch():
    from pal_jax.training import aot
    b = aot.stage1_batch(4, 128, 48, packing=True)
    assert b["segment_ids"].shape == (4, 128) and b["win_task"].shape == (4, 48) and "task" not in b
    assert "segment_ids" not in aot.stage1_batch(4, 128, 48)


def test_packing_key_validated():
    c = tiny_config()
    # a config file may set any value (the CLI's typed override refuses a non-bool itself)
    c.data = ml_collections.ConfigDict({**c.data.to_dict(), "packing": "yes"})
    with pytest.raises(ConfigError, match=r"config\.data\.packing = 'yes': expected True or False"):
        validate(c)
    validate(tiny_config(data__packing=True))


def test_checkpoint_from_before_packing_resumes_unpacked_only():
    """A checkpoint whose config has no data.packing (written before the key existed) resumes with packing off,
    the behaviour it was trained with, and is refused, naming the key, with packing on."""
    import json
    task = train.Task(name="stage1", loss_fn=None, train_batch=None, eval_batches=None)
    now = json.loads(tiny_config().to_json_best_effort())
    old = json.loads(json.dumps(now))
    del old["data"]["packing"]
    train._check_resume({"config": old}, now, task, "W")
    on = json.loads(tiny_config(data__packing=True).to_json_best_effort())
    with pytest.raises(ConfigError, match=r"config\.data\.packing: checkpoint has False, now True"):
        train._check_resume({"config": old}, on, task, "W")


@pytest.mark.slow  # 15 s; the loss and gradient equality of packed rows stays in the default suite (llama)
def test_stage1_packed_eval_loss_equals_unpacked_and_trains(tmp_path):
    """The real Stage 1 task on the synthetic corpus: the held-out loss of the same params is the same packed or
    not (the whole dev split, per task too), there are fewer steps per epoch, and a packed run trains end to end."""
    longer = {"data__max_len": 256, "data__buckets": (128, 256), "model__max_len": 256}  # room for 2 examples
    cu = tiny_config(train__eval_batches=0, **longer)
    cp = tiny_config(train__eval_batches=0, data__packing=True, **longer)
    exp_u = Experiment(cu, str(tmp_path / "u"))
    exp_p = Experiment(cp, str(tmp_path / "p"))
    task_u, task_p = stage1.build_task(exp_u), stage1.build_task(exp_p)
    assert task_p.data_info["steps_per_epoch"] < task_u.data_info["steps_per_epoch"]
    params = exp_u.model.init(0)
    res = {}
    for name, exp, task in (("u", exp_u, task_u), ("p", exp_p, task_p)):
        step = train.make_eval_step(exp.model, task)
        res[name] = train.evaluate_loss(step, params, task, exp.model.mesh)
    assert res["u"]["loss"] > 1.0
    assert res["p"]["loss"] == pytest.approx(res["u"]["loss"], abs=1e-5)
    # the per-task losses are logged as each batch's task mean weighted by the batch's target tokens
    # (stage1.sft_loss_fn), so they depend on which examples share a batch: close, not equal
    for k in ("select_loss", "generate_loss"):
        assert res["p"][k] == pytest.approx(res["u"][k], rel=1e-3), k
    summary = stage1.run(tiny_config(data__packing=True, train__steps=6, **longer), str(tmp_path / "run"))
    assert summary["step"] == 6 and np.isfinite(summary["dev"]["loss"])
