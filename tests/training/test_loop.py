"""Stage 1 training: config errors, sharding invariance, accumulation, checkpoints (kill, SIGTERM, remesh, init_from)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import REPO, main_cmd, run_main, tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.training import stage1
from pal_jax.training import loop as train
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.training.experiment import Experiment
from pal_jax.model.spec import ModelSpec, model_config


def saved_params(config, workdir, devices=None):
    exp = Experiment(config, str(workdir), need_corpus=False, devices=devices)
    params, step = ckpt_lib.load_params(str(workdir), exp.model.abstract)
    return jax.device_get(params), step


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_invalid_value_names_key():
    c = tiny_config(train__lr=-1.0, data__select_ratio=2.0)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert "config.train.lr = -1.0: expected a finite number > 0" in str(e.value)
    assert "config.data.select_ratio = 2.0" in str(e.value)


@pytest.mark.parametrize("key", ["train__lr", "stage2__lr"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0])
def test_non_finite_or_zero_learning_rate_refused(key, value):
    with pytest.raises(ConfigError) as e:
        validate(tiny_config(**{key: value}))
    assert f"config.{key.replace('__', '.')} = {value!r}: expected a finite number > 0" in str(e.value)


def test_step_with_non_finite_update_keeps_params_and_counts_bad():
    """The step checks its new params, not only the loss and gradient: an infinite learning rate gives a finite
    loss and gradient but non-finite params, and the step must keep the old ones."""
    c = tiny_config()
    ms = ModelSpec(model_config(c.model, 64), mesh_lib.make_mesh(c.mesh, jax.devices()[:1]),
                          mesh_lib.axis_rules(c))

    def loss_fn(model, batch, extra):
        h = model.hidden_states(batch["inputs"], positions=batch["positions"])
        return jnp.sum(h.astype(jnp.float32) ** 2), jnp.float32(h.size), {}

    task = train.Task(name="t", loss_fn=loss_fn, train_batch=None, eval_batches=None)
    rows = np.random.default_rng(0).integers(0, 64, size=(8, 16)).astype(np.int32)
    batch = {"inputs": rows, "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()}
    for lr, finite in ((float("inf"), 0.0), (1e-2, 1.0)):
        tx = optax.sgd(lr)
        shardings = train.optimizer_shardings(tx, ms)
        step = train.make_train_step(ms, task, tx, 1, shardings)
        params = ms.init(0)
        before = jax.device_get(params)
        new, _, metrics = step(params, jax.jit(tx.init, out_shardings=shardings)(params),
                               mesh_lib.global_batch(batch, ms.mesh), None)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
        assert float(metrics["finite"]) == finite, lr
        new = jax.device_get(new)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
        assert (max_diff(new, before) == 0.0) == (finite == 0.0), lr


def test_run_with_all_updates_non_finite_stops_without_saving_them(tmp_path):
    """lr = inf (what validation now refuses, reached here through stage1.run): every step is skipped, the run
    stops after max_bad_steps with BadStepsError, and every checkpoint it saved holds the finite initial params.
    log_every 100: the guard does not wait for a log step."""
    c = tiny_config(train__lr=float("inf"), train__warmup_steps=0, train__schedule="constant", train__steps=10,
                    train__max_bad_steps=4, train__checkpoint_every=2, train__log_every=100, train__eval_every=100)
    with pytest.raises(train.BadStepsError) as e:
        stage1.run(c, str(tmp_path / "w"))
    assert "4 consecutive steps (to step 4)" in str(e.value) and "params are those of step 0" in str(e.value)
    assert _steps(str(tmp_path / "w")) == [2, 4]
    params, step = saved_params(c, tmp_path / "w")
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    exp = Experiment(c, str(tmp_path / "w"), need_corpus=False)
    assert max_diff(params, jax.device_get(exp.model.init(c.seed))) == 0.0


def test_batch_that_does_not_divide_the_devices_stops_before_the_tokenizer(tmp_path):
    from pal_jax.main import check_devices
    check_devices(tiny_config(train__batch_size=16), 8)
    with pytest.raises(ConfigError) as e:
        check_devices(tiny_config(train__batch_size=12, train__grad_accum=2, mode="pipeline", stage2__batch_size=8),
                      4)
    assert "config.train.batch_size = 12: expected a multiple of data*fsdp*grad_accum = 8 on mesh {'data': 4, " \
           "'fsdp': 1, 'tensor': 1} (4 devices)" in str(e.value)
    assert "config.stage2.batch_size" not in str(e.value)  # 8 divides
    with pytest.raises(ConfigError, match=r"config.mesh: \{'data': 3, 'fsdp': 1, 'tensor': 1\} uses 3 devices, "
                                          r"but 8 are present"):
        check_devices(tiny_config(mesh__data=3), 8)
    r = run_main(tmp_path / "w", {"train.batch_size": 5}, devices=2)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: invalid config for these devices:" in r.stderr and "config.train.batch_size = 5" in r.stderr
    assert not (tmp_path / "w" / "tokenizer").exists()


def test_cli_unknown_key_and_bad_value_stop_before_work(tmp_path):
    r = run_main(tmp_path / "w1", {"train.lrr": 0.1})
    assert r.returncode != 0 and "lrr" in r.stderr
    r = run_main(tmp_path / "w2", {"data.source": "reddit"})
    assert r.returncode == 2
    assert "config.data.source = 'reddit': expected one of ('synthetic', 'convai2', 'jsonl', 'tfds')" in r.stderr
    assert not (tmp_path / "w2").exists()  # stopped before any work


def test_same_loss_on_1_and_8_devices(tmp_path):
    c1 = tiny_config(train__steps=3, train__eval_every=3)
    s1 = stage1.run(c1, str(tmp_path / "one"), devices=jax.devices()[:1])
    c8 = tiny_config(train__steps=3, train__eval_every=3, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
    s8 = stage1.run(c8, str(tmp_path / "eight"))
    assert s1["dev"]["loss"] == pytest.approx(s8["dev"]["loss"], abs=1e-5)
    p1, _ = saved_params(c1, tmp_path / "one", devices=jax.devices()[:1])
    p8, _ = saved_params(c8, tmp_path / "eight")
    assert max_diff(p1, p8) < 1e-5
    # and the 8-device params really were sharded over the tensor axis
    exp = Experiment(c8, str(tmp_path / "eight"), need_corpus=False)
    specs = {str(s.spec) for s in jax.tree.leaves(exp.model.shardings)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)


def test_grad_accumulation_matches_full_batch(tmp_path):
    c1 = tiny_config(train__steps=2, train__eval_every=2, train__batch_size=16)
    c2 = tiny_config(train__steps=2, train__eval_every=2, train__batch_size=16, train__grad_accum=2)
    stage1.run(c1, str(tmp_path / "a"))
    stage1.run(c2, str(tmp_path / "b"))
    assert max_diff(saved_params(c1, tmp_path / "a")[0], saved_params(c2, tmp_path / "b")[0]) < 1e-5


def test_checkpoint_saved_on_8_devices_restores_on_1(tmp_path):
    c8 = tiny_config(train__steps=3, mesh__data=4, mesh__tensor=2)
    stage1.run(c8, str(tmp_path / "w"))
    p8, step = saved_params(c8, tmp_path / "w")
    c1 = tiny_config(train__steps=3)
    p1, step1 = saved_params(c1, tmp_path / "w", devices=jax.devices()[:1])
    assert step == step1 == 3
    assert max_diff(p8, p1) == 0.0
    meta = ckpt_lib.load_meta(str(tmp_path / "w"))
    assert meta["step"] == 3 and meta["data"]["next_step"] == 3 and meta["config"]["model"]["d_model"] == 32


def test_init_from_loads_params_only(tmp_path):
    c = tiny_config(train__steps=3)
    stage1.run(c, str(tmp_path / "s1"))
    c2 = tiny_config(train__steps=2, init_from=str(tmp_path / "s1"), tokenizer__path=str(tmp_path / "s1/tokenizer"))
    exp = Experiment(c2, str(tmp_path / "s2"))
    init = stage1.initial_params(exp)
    assert max_diff(jax.device_get(init), saved_params(c, tmp_path / "s1")[0]) == 0.0
    summary = stage1.run(c2, str(tmp_path / "s2"))
    assert summary["step"] == 2  # counted from 0: the optimizer state and step were not taken from s1
    assert ckpt_lib.load_meta(str(tmp_path / "s2"))["step"] == 2


def _wait_for(path_fn, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path_fn():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    over = {"train.steps": 12, "train.checkpoint_every": 2, "train.eval_every": 100}
    ref = run_main(tmp_path / "ref", over)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd, env = main_cmd(tmp_path / "killed", over)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: any(s >= 4 for s in _steps(str(tmp_path / "killed"))), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _steps(str(tmp_path / "killed"))
    assert before and max(before) < 12, before
    again = run_main(tmp_path / "killed", over)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    c = tiny_config(**{k.replace(".", "__"): v for k, v in over.items()})
    pr, sr = saved_params(c, tmp_path / "ref")
    pk, sk = saved_params(c, tmp_path / "killed")
    assert sr == sk == 12
    assert max_diff(pr, pk) <= 1e-6


def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path):
    over = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.eval_every": 100000}
    cmd, env = main_cmd(tmp_path / "w", over)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "w" / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = _steps(str(tmp_path / "w"))
    assert len(steps) == 1 and 2 <= steps[0] < 100000
    assert "preempted: True" in out
    meta = ckpt_lib.load_meta(str(tmp_path / "w"))
    assert meta["step"] == steps[0]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[0]["step"] == 2 and np.isfinite(rows[0]["train/loss"])


def test_resume_or_init_from_another_model_shape_names_the_key(tmp_path):
    """The saved config is compared before any array is restored: the error names config.model.d_model, not
    Orbax's shape mismatch."""
    c = tiny_config(train__steps=2, train__checkpoint_every=2, train__eval_every=100)
    stage1.run(c, str(tmp_path / "s1"))
    wide = tiny_config(train__steps=4, model__d_model=64)
    with pytest.raises(ConfigError) as e:  # main prints it as one 'error:' line, exit 2
        stage1.run(wide, str(tmp_path / "s1"))
    assert f"cannot resume from {tmp_path / 's1' / 'checkpoints'}" in str(e.value)
    assert "config.model.d_model: checkpoint has 32, now 64" in str(e.value)
    c2 = tiny_config(train__steps=2, model__d_model=64, init_from=str(tmp_path / "s1"),
                     tokenizer__path=str(tmp_path / "s1/tokenizer"))
    with pytest.raises(ConfigError, match=r"config.init_from = .*s1': the weights do not fit config.model "
                                         r"\(d_model: file 32 vs config 64; head_dim"):
        stage1.initial_params(Experiment(c2, str(tmp_path / "s2")))


def test_resume_drops_metrics_written_after_the_restored_step(tmp_path):
    """A run interrupted after logging steps past its last checkpoint (here: the step-6 checkpoint removed, as a
    kill during its save leaves it) resumes from step 3 and writes steps 4-6 again: each appears once."""
    import shutil
    c = tiny_config(train__steps=6, train__checkpoint_every=3, train__log_every=1, train__eval_every=3)
    w = tmp_path / "w"
    stage1.run(c, str(w))
    shutil.rmtree(w / "checkpoints" / "6")
    with open(w / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a row cut short by the kill
    stage1.run(c, str(w))
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    dev_steps = [r["step"] for r in rows if "dev/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6] and dev_steps == [3, 6], (train_steps, dev_steps)
