"""Multi-host: two processes on 127.0.0.1 (2 CPU devices each, jax.distributed over gloo) train Stage 1 and Stage 2
with the losses of one process with 4 devices; their checkpoint restores in one process. Plus the pieces that need
no second process: which rows a host builds, the --distributed decision, gs:// workdirs left as URLs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app

from helpers import REPO, cli_args, tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.training import stage2
from pal_jax.data import convai2, corpus, pipeline, templates
from pal_jax.training.experiment import Experiment
from pal_jax.main import distributed_args
from pal_jax.core.metrics_writer import MetricsWriter
from pal_jax.training.make_pairs import pairs_path

# One bucket (one compiled shape per step function), 3 steps per stage logged every step, a 2 x 2 mesh: the batch
# split over data and fsdp, the params sharded over fsdp, so both span the two processes.
OVER = {"data.synthetic_dialogues": 30, "data.buckets": (128,), "train.steps": 3, "train.log_every": 1,
        "train.eval_every": 3, "train.eval_batches": 1, "train.checkpoint_every": 3, "mesh.data": 2,
        "mesh.fsdp": 2, "stage2.steps": 3, "stage2.batch_size": 8, "stage2.warmup_steps": 1,
        "stage2.dev_fraction": 0.2, "train.sample_turns": 4}
TOL = 2e-5  # |loss difference|: the same math, summed in another order across processes


def _config(**extra):
    return tiny_config(**{k.replace(".", "__"): v for k, v in {**OVER, **extra}.items()})


def _write_pairs(config, path):
    """Preference pairs without decoding (keeps the test fast): chosen = the gold reply, rejected = the next
    turn's reply; select pairs: the labelled target against another candidate."""
    records = convai2.records_from_dialogues(corpus.load_corpus(config.data)["train"])
    rows = []
    for i, r in enumerate(records):
        base = {"id": r.id, "persona": list(r.persona), "history": list(r.history), "persona_label": r.persona_label}
        other = records[(i + 1) % len(records)].response
        if other.split() != r.response.split():
            rows.append({**base, "kind": "generate", "chosen": r.response, "rejected": other})
        label = r.persona_label
        rows.append({**base, "kind": "select", "chosen": templates.select_target(list(r.persona), label),
                     "rejected": templates.select_target(list(r.persona), -1 if label >= 0 else 0)})
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# XLA's CPU backend at LLVM -O0: compiles about 4x faster (these tiny programs are compile-bound); the same for
# the reference run and the two processes, so the comparison is like for like.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={}"


def _start(config_file: str, workdir, overrides: dict, processes: int, devices: int) -> list[subprocess.Popen]:
    """python -m pal_jax.main in `processes` processes of `devices` CPU devices each; more than one process:
    coordinated by jax.distributed on a free port of 127.0.0.1."""
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS.format(devices), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pal_jax.main", f"--config={config_file}", f"--workdir={workdir}",
           *cli_args({**OVER, **overrides})]
    if processes > 1:
        cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    return [subprocess.Popen(cmd + ([f"--process_id={i}"] if processes > 1 else []), env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _wait(procs: list[subprocess.Popen], timeout: int = 400) -> list[subprocess.CompletedProcess]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, r in enumerate(out):
        assert r.returncode == 0, f"process {i} of {len(out)} failed:\n{r.stderr[-4000:]}"
    return out


def _metrics(workdir, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(workdir, name))]


def _losses(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def _params(config, workdir, devices):
    exp = Experiment(config, str(workdir), need_corpus=False, devices=devices)
    params, step = ckpt_lib.load_params(str(workdir), exp.model.abstract)
    return jax.device_get(params), step


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
    """Stage 1 at once in the reference (one process, 4 devices) and in two processes of 2 devices each."""
    root = tmp_path_factory.mktemp("multihost")
    ref1, mh1 = root / "ref1", root / "mh1"
    runs = [_start("configs/stage1.py:tiny", ref1, {}, 1, 4), _start("configs/stage1.py:tiny", mh1, {}, 2, 2)]
    _, s1 = [_wait(r) for r in runs]
    return ref1, mh1, s1


@pytest.mark.slow  # 65 s (two Stage 1 runs in its fixture): the default suite had reached 15 min 11 s on a clean clone
def test_two_processes_match_one_process_with_four_devices(stage1_runs, tmp_path):
    ref1, mh1, s1 = stage1_runs
    c1 = _config()
    pairs = str(tmp_path / "pairs.jsonl")
    _write_pairs(c1, pairs)
    ref2, mh2 = tmp_path / "ref2", tmp_path / "mh2"
    s2_over = {"stage2.pairs": pairs}
    runs = [_start("configs/stage2.py:tiny", ref2, {"init_from": str(ref1), **s2_over}, 1, 4),
            _start("configs/stage2.py:tiny", mh2, {"init_from": str(mh1), **s2_over}, 2, 2)]
    _, s2 = [_wait(r) for r in runs]

    for ref, mh, name in ((ref1, mh1, "stage1"), (ref2, mh2, "stage2")):
        a, b = _metrics(ref), _metrics(mh)
        for key in ("train/loss", "dev/loss"):
            la, lb = _losses(a, key), _losses(b, key)
            assert [s for s, _ in lb] == [s for s, _ in la] == ([1, 2, 3] if key == "train/loss" else [3]), (name, lb)
            assert np.allclose([v for _, v in lb], [v for _, v in la], rtol=0, atol=TOL), (name, key, la, lb)
        # every step logged once: only process 0 writes metrics (the workdir is shared)
        assert len(b) == len(a)
        # samples while training (pal_jax/training/samples.py): decoded by both processes together, written once by process
        # 0, the same selections and replies as one process
        sa, sb = (_metrics(w, "samples.jsonl") for w in (ref, mh))
        assert [r["step"] for r in sb] == [3] * 4, (name, sb)
        assert [(r["id"], r["persona"], r["reply"]) for r in sb] == [(r["id"], r["persona"], r["reply"]) for r in sa]
        assert len(os.listdir(mh / "tensorboard")) == 1
    # process 0 trained and saved the tokenizer (whole files, renamed into place); process 1 loaded it
    assert sorted(os.listdir(mh1 / "tokenizer")) == ["pal_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    # Stage 2's first step: policy = reference (the Stage 1 checkpoint the two processes restored), so the loss is
    # DPO's log 2 plus stage2.sft_weight (1) x the chosen replies' NLL plus stage2.align_weight (0.1) x the alignment
    # term
    first = {k: _losses(_metrics(mh2), f"train/{k}")[0][1] for k in ("loss", "dpo_loss", "chosen_nll", "align_loss")}
    assert first["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert first["loss"] == pytest.approx(np.log(2) + first["chosen_nll"] + 0.1 * first["align_loss"], abs=1e-4)
    # progress lines and the summary come from process 0 only
    for res in (s1, s2):
        for i in (0, 1):
            assert f"jax.distributed: process {i} of 2, 2 local / 4 global devices" in res[i].stderr
        assert "step 3/3 loss" in res[0].stderr and "step: 3" in res[0].stdout
        assert "step 3/3 loss" not in res[1].stderr and "step: 3" not in res[1].stdout
    # the two processes' Stage 2 checkpoint restores in one process, on one device, equal to the reference
    c2 = _config(mode="stage2", **{"tokenizer.path": str(mh1 / "tokenizer"), "mesh.data": 1, "mesh.fsdp": 1})
    one = jax.devices()[:1]
    p_mh, step = _params(c2, mh2, one)
    p_ref, _ = _params(c2, ref2, one)
    assert step == 3
    assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(p_mh), jax.tree.leaves(p_ref))) < TOL
    assert ckpt_lib.load_meta(str(mh2))["data"]["next_step"] == 3
    # and one process (4 devices) resumes from it (params, optimizer state, step): nothing left to do at step 3
    c2 = _config(mode="stage2", init_from=str(mh1), **{"stage2.pairs": pairs})
    assert stage2.run(c2, str(mh2), devices=jax.devices()[:4])["step"] == 3


@pytest.mark.slow
def test_two_processes_make_pairs_and_evaluate(stage1_runs, tmp_path):
    """make_pairs (decoding and candidate scoring over a mesh spanning both processes) writes the pairs of one
    process with 4 devices; evaluate writes its report from process 0."""
    _, mh1, _ = stage1_runs
    over = {"init_from": str(mh1), "stage2.max_pair_turns": 16, "predict.max_new_tokens": 6, "predict.batch_size": 8}
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [_start("configs/make_pairs.py:tiny", one, over, 1, 4), _start("configs/make_pairs.py:tiny", two, over, 2, 2)]
    for r in runs:
        _wait(r)
    a, b = ([json.loads(x) for x in open(w / "pairs" / "part-00000.jsonl")] for w in (one, two))
    assert len(a) == len(b) == 16
    for x, y in zip(a, b):
        assert (x["id"], x["rejected"], x["selected"]) == (y["id"], y["rejected"], y["selected"])
        assert np.allclose(x["select_scores"], y["select_scores"], atol=1e-4)
    assert open(one / "pairs.jsonl").read() == open(two / "pairs.jsonl").read()
    ev = _wait(_start("configs/evaluate.py:tiny", tmp_path / "ev", {
        "eval.checkpoints": f"s1={mh1}", "predict.max_records": 8, "predict.max_new_tokens": 6,
        "predict.batch_size": 8, "eval.sentence_encoder": ""}, 2, 2))
    report = tmp_path / "ev" / "eval" / "report.md"
    assert "| Persona selection acc. ↑ |" in report.read_text() and "report: " in ev[0].stdout
    assert "report: " not in ev[1].stdout  # process 1 prints no summary
    assert len(open(tmp_path / "ev" / "eval" / "predictions_s1.jsonl").readlines()) == 8


def test_each_host_builds_only_its_rows():
    """rows_of picks rows of the global batch; their union over hosts is the global batch, row for row, with the
    global bucket length (one host's rows alone may fit a shorter bucket)."""
    c = _config()
    from pal_jax.model import tokenizer as tok_lib
    dialogues = corpus.load_corpus(c.data)["train"]
    from pal_jax.weights.tokenizers import tokenizer_texts
    tok = tok_lib.train_tokenizer(tokenizer_texts(dialogues), 400)
    enc = pipeline.encode_examples(pipeline.stage1_examples(dialogues), tok, 128)
    src = pipeline.BatchSource(enc, 8, (96, 128), seed=0, select_ratio=0.5)
    halves = [lambda n: np.arange(n // 2), lambda n: np.arange(n // 2, n)]
    for step in range(4):
        full = src.batch(step)
        parts = [src.batch(step, rows_of) for rows_of in halves]
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    # a batch whose long rows are all in one half: the other half is still padded to the global bucket
    short, long_ = np.flatnonzero(src.lengths <= 96)[:4], np.flatnonzero(src.lengths > 96)[:4]
    assert len(short) == len(long_) == 4
    part = src.make_batch(np.concatenate([short, long_]), np.arange(4))
    assert part["inputs"].shape == (4, 128) and src.make_batch(short)["inputs"].shape == (4, 96)
    # Stage 2 pairs: rows [chosen..., rejected...]; any subset of the 2B rows
    rec = convai2.records_from_dialogues(dialogues)[:6]
    prs = [{"persona": list(r.persona), "history": list(r.history), "persona_label": r.persona_label,
            "chosen": r.response, "rejected": rec[(i + 1) % 6].response} for i, r in enumerate(rec)]
    psrc = stage2.PairSource(stage2.encode_pairs(prs, tok, 128), 4, (96, 128), seed=0)
    psrc.set_pad(tok.pad_id)
    whole = psrc.batch(0)
    odd = psrc.batch(0, lambda n: np.arange(1, n, 2))
    assert psrc.rows_per_batch == 8 and whole["inputs"].shape[0] == 8
    for k in whole:
        np.testing.assert_array_equal(odd[k], whole[k][1::2])


def test_distributed_flag_decision():
    none = {}
    assert distributed_args("auto", None, None, None, env=none) is None
    assert distributed_args("off", None, None, None, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None
    assert distributed_args("on", None, None, None, env=none) == {}  # TPU pod: JAX finds the rest itself
    assert distributed_args("auto", "h:1", 2, 1, env=none) == {"coordinator_address": "h:1", "num_processes": 2,
                                                               "process_id": 1}
    assert distributed_args("auto", None, None, None, env={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
    assert distributed_args("auto", None, None, None, env={"TPU_WORKER_HOSTNAMES": "a"}) is None  # one host
    assert distributed_args("auto", None, None, None, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert distributed_args("auto", None, None, None, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) == {}
    with pytest.raises(app.UsageError, match="--distributed=off contradicts --coordinator_address"):
        distributed_args("off", "h:1", 2, 0, env=none)
    with pytest.raises(app.UsageError, match="without --coordinator_address"):
        distributed_args("auto", None, 2, 0, env=none)


def test_url_workdirs_are_not_made_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ckpt_lib.resolve("gs://bucket/x") == "gs://bucket/x"
    assert ckpt_lib.resolve("runs/x") == str(tmp_path / "runs" / "x")  # a local path: absolute, as before
    w = MetricsWriter("gs://bucket/x", enabled=False)
    assert (w.jsonl_path, w.tb_dir) == ("gs://bucket/x/metrics.jsonl", "gs://bucket/x/tensorboard")
    assert pairs_path("gs://bucket/x") == "gs://bucket/x/pairs.jsonl"


def test_cpu_devices_split_the_host_before_jax_starts():
    from pal_jax.core.mesh import cpu_devices
    assert cpu_devices(0, env={}) == 0  # JAX's default
    assert cpu_devices(2, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == 0  # the flag wins
    code = ("from pal_jax.core.mesh import cpu_devices; n = cpu_devices(2, env={}); import jax; "
            "print(n, jax.device_count(), jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "2", "cpu"]
