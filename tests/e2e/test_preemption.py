"""SIGTERM (preemption) in every phase, and a failed checkpoint save (issue 16, item 5)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time

import pytest

from helpers import REPO, main_cmd, run_main, tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.training import make_pairs as pairs_lib
from pal_jax.core import preemption
from pal_jax.training import stage1
from pal_jax.training import stage2


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("at,where", [(3, "batch"), (3, "save"), (6, "batch")],
                         ids=["checkpoint_step", "during_save", "last_step"])
def test_sigterm_on_a_checkpoint_step_or_the_last_step_saves_that_step_once(tmp_path, monkeypatch, at, where):
    """Before: the loop saved step `at` (a checkpoint step or the last one) and then forced a second save of it:
    StepAlreadyExistsError, exit 1."""
    build, save = stage1.build_task, ckpt_lib.Checkpointer.save

    def build_task(exp):
        task = build(exp)
        inner = task.train_batch

        def batch(step, rows_of):
            if where == "batch" and step + 1 == at:  # while step `at` is prepared
                _sigterm_self()
            return inner(step, rows_of)
        task.train_batch = batch
        return task

    def save_and_signal(self, step, *a, **kw):
        if where == "save" and step == at:  # inside the save of step `at`
            _sigterm_self()
        return save(self, step, *a, **kw)

    monkeypatch.setattr(stage1, "build_task", build_task)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_and_signal)
    c = tiny_config(train__steps=6, train__checkpoint_every=3, train__eval_every=100)
    summary = stage1.run(c, str(tmp_path / "w"))
    assert summary["step"] == at
    assert summary["preempted"] is (at < 6)  # on the last step the run is complete
    assert _steps(tmp_path / "w") == [3, 6][:at // 3]
    assert ckpt_lib.load_meta(str(tmp_path / "w"))["step"] == at


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    w = tmp_path_factory.mktemp("s1") / "w"
    stage1.run(tiny_config(train__steps=2, train__checkpoint_every=2, train__eval_every=100), str(w))
    return str(w)


def _pairs_config(s1: str):
    return tiny_config(mode="make_pairs", init_from=s1, stage2__max_pair_turns=24)


def test_sigterm_during_make_pairs_abandons_the_shard_and_a_rerun_gives_the_same_pairs(tmp_path, monkeypatch,
                                                                                      stage1_dir):
    monkeypatch.setattr(pairs_lib, "SHARD", 8)  # 24 turns: 3 shards
    full = stage2.run_make_pairs(_pairs_config(stage1_dir), str(tmp_path / "full"))
    assert full["turns"] == 24
    real, calls = pairs_lib.rejected_replies, []

    def replies(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # while shard 2 of 3 is decoded
            _sigterm_self()
        return real(*a, **kw)

    monkeypatch.setattr(pairs_lib, "rejected_replies", replies)
    w = tmp_path / "cut"
    with preemption.handling(), pytest.raises(preemption.Preempted, match=r"make_pairs \(shard 2/3 abandoned"):
        stage2.run_make_pairs(_pairs_config(stage1_dir), str(w))
    assert sorted(os.listdir(w / "pairs")) == ["part-00000.jsonl"]  # no half shard, no temp file
    assert not (w / "pairs.jsonl").exists()
    monkeypatch.setattr(pairs_lib, "rejected_replies", real)
    again = stage2.run_make_pairs(_pairs_config(stage1_dir), str(w))
    assert again["pairs"] == full["pairs"]
    assert (w / "pairs.jsonl").read_text() == (tmp_path / "full" / "pairs.jsonl").read_text()


def test_sigterm_during_evaluation_writes_no_report(tmp_path, monkeypatch, stage1_dir):
    """Evaluation is abandoned whole: no predictions, metrics or report under their final names, and the message
    names the checkpoint being evaluated."""
    from pal_jax.evaluation import evaluate as evaluate_lib
    real = evaluate_lib.evaluate

    def evaluate(*a, **kw):
        _sigterm_self()
        return real(*a, **kw)

    monkeypatch.setattr(evaluate_lib, "evaluate", evaluate)
    out = tmp_path / "eval"
    c = tiny_config(mode="evaluate", eval__checkpoints=f"s1={stage1_dir}", eval__output_dir=str(out),
                    tokenizer__path=os.path.join(stage1_dir, "tokenizer"), predict__max_records=4,
                    eval__sentence_encoder="")
    with preemption.handling(), pytest.raises(preemption.Preempted, match=r"evaluate \(s1: predicting"):
        evaluate_lib.run_evaluate(c, str(tmp_path / "w"))
    assert not out.exists() or os.listdir(out) == []


def test_cli_sigterm_before_training_exits_zero_and_the_rerun_cleans_temp_files(tmp_path):
    """SIGTERM while the run loads its data (outside the training loop) exited with -15 and no message."""
    w = tmp_path / "w"
    over = {"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 100}
    cmd, env = main_cmd(w, over)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = w / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the lock is taken once the handler is in place, before the data is loaded
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "rerun the same command to resume" in err, err[-3000:]
    # on a loaded machine the signal can land after the first step; then the preemption saved that step, and the
    # rerun must continue from it (both are preemptions that exit 0 and resume)
    first = _steps(w)
    assert first in ([], [1]), first
    orphans = [w / "pairs" / "part-00000.jsonl.tmp-999999", w / "tokenizer" / ".tokenizer.json.tmp-999999"]
    for p in orphans:  # as a kill during their write leaves them
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    again = run_main(w, over)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not any(p.exists() for p in orphans)
    assert "temporary file(s) left by an interrupted run" in again.stderr
    assert _steps(w) == first + [2]


def _file_size_limit(n_bytes: int):
    def limit():  # writes past n_bytes fail with EFBIG (SIGXFSZ ignored) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


def test_cli_failed_async_save_stops_at_once_with_one_line(tmp_path):
    """A save that cannot write (here: a file size limit, as a full disk) stops the run at the next step with
    one 'error:' line naming the checkpoint folder, exit 1; before, training went on and ended in tracebacks."""
    w = tmp_path / "w"
    over = {"train.steps": 40, "train.checkpoint_every": 2, "train.eval_every": 100, "train.log_every": 1}
    cmd, env = main_cmd(w, over)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(40_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint save of step 2 to {w / 'checkpoints'} failed"), last
    assert "rerun the same command" in last
    logged = [int(x.split("step ")[1].split("/")[0]) for x in proc.stderr.splitlines() if "] step " in x]
    assert logged and max(logged) <= 4, logged  # stopped within a step or two of the failed save
    # Orbax's own report of the failure is kept short (its tracebacks cut to one line each; pending TensorStore
    # writes still print a few 'Event loop is closed' tracebacks from C, which cannot be routed): before, ~550
    # lines; and no pal_jax frame (the error is the one line above)
    assert str(REPO / "pal_jax") not in proc.stderr
    assert len(proc.stderr.splitlines()) < 200, len(proc.stderr.splitlines())


def test_sigterm_on_stage1s_last_step_in_the_pipeline_stops_before_stage2(tmp_path, monkeypatch):
    """Stage 1 completes (its last step is saved once); the pipeline then stops before the pairs, as main does with
    its handler installed, instead of starting the next phase on a machine that is going away."""
    from pal_jax import pipeline as pipeline_mode
    build = stage1.build_task

    def build_task(exp):
        task = build(exp)
        inner = task.train_batch

        def batch(step, rows_of):
            if step + 1 == 2:
                _sigterm_self()
            return inner(step, rows_of)
        task.train_batch = batch
        return task

    monkeypatch.setattr(stage1, "build_task", build_task)
    c = tiny_config(train__steps=2, train__checkpoint_every=2, train__eval_every=100)
    with preemption.handling(), pytest.raises(preemption.Preempted, match="Stage 1 is complete"):
        pipeline_mode.run(c, str(tmp_path))
    assert _steps(tmp_path / "stage1") == [2]
    assert not (tmp_path / "stage2" / "pairs").exists() and not (tmp_path / "stage2" / "checkpoints").exists()
