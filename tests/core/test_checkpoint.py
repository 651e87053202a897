"""Checkpoints verified on restore (issue 16, item 2): a damaged step is detected, moved aside, and the run falls
back to the newest readable one; none readable is one CheckpointError naming the folder and what to do."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from helpers import run_main, tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.training import stage1
from pal_jax.core.errors import CheckpointError

CONFIG = dict(train__steps=6, train__checkpoint_every=3, train__eval_every=100, train__keep_checkpoints=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Stage 1 run with checkpoints at steps 3 and 6 (copied by each test before it damages one)."""
    w = tmp_path_factory.mktemp("trained") / "w"
    stage1.run(tiny_config(**CONFIG), str(w))
    return w


def _copy(trained, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(trained, w)
    return w


def _largest(step_dir, item: str):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / item) for f in fs]
    return max(files, key=os.path.getsize)


def _meta_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "meta") for f in fs]
    return next(f for f in files if open(f, "rb").read(1) == b"{")


def damage(step_dir, how: str) -> tuple[str, ...]:
    """Damage a step as a disk or a user might; returns the relative paths damaged."""
    if how == "random_bytes":  # same size, different content: only a checksum sees it
        path = _largest(step_dir, "params")
        data = bytearray(open(path, "rb").read())
        mid = len(data) // 2
        data[mid:mid + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
        open(path, "wb").write(bytes(data))
    elif how == "truncated":  # every data file: the largest alone may hold only data the restore never reads
        # (an OCDBT file keeps superseded nodes; which file that is depends on the async writes' timing)
        paths = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "params") for f in fs
                 if os.path.basename(r) == "d"]
        assert paths, f"no OCDBT data files under {step_dir / 'params'}"
        for path in paths:
            os.truncate(path, os.path.getsize(path) // 2)
        return tuple(os.path.relpath(q, step_dir) for q in paths)
    elif how == "missing_metadata":
        path = str(step_dir / "params" / "_METADATA")
        os.remove(path)
    elif how == "cut_meta":
        path = _meta_file(step_dir)
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        raise ValueError(how)
    return (os.path.relpath(path, step_dir),)


def test_each_saved_step_records_its_checksums(trained):
    for step in (3, 6):
        rec = json.loads((trained / "checkpoints" / str(step) / ckpt_lib.CHECKSUMS).read_text())
        assert rec["step"] == step
        assert "params/_METADATA" in rec["files"] and any(k.startswith("meta/") for k in rec["files"])
        assert ckpt_lib.verify(str(trained / "checkpoints"), step) is None


EXPECTED = {"random_bytes": "does not match its SHA-256 checksum", "truncated": "bytes, expected",
            "missing_metadata": "params/_METADATA is missing", "cut_meta": "bytes, expected"}


@pytest.mark.parametrize("how,checksums", [("random_bytes", True), ("truncated", True), ("missing_metadata", True),
                                           ("cut_meta", True), ("truncated", False), ("missing_metadata", False),
                                           ("cut_meta", False)])
def test_damaged_latest_step_is_moved_aside_and_the_run_resumes_from_the_previous(trained, tmp_path, caplog, how,
                                                                                  checksums):
    """Before: random bytes restored silently (training went on from garbage); a truncated file, a missing
    params/_METADATA or a cut meta JSON gave a raw traceback and no rerun could continue. Without a checksum file
    (a step saved before checksums) the read errors are still caught."""
    w = _copy(trained, tmp_path)
    step6 = w / "checkpoints" / "6"
    if not checksums:
        for s in (3, 6):
            os.remove(w / "checkpoints" / str(s) / ckpt_lib.CHECKSUMS)
    rels = damage(step6, how)
    # a reader (predict, evaluate, Stage 2) falls back too, and leaves the step where it is (not its workdir);
    # without checksums load_meta reads the meta record alone, so it sees only damage to that
    if checksums or how == "cut_meta":
        with caplog.at_level(logging.WARNING):
            assert ckpt_lib.load_meta(str(w))["step"] == 3
        assert step6.is_dir()
        assert "step 6 is damaged" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = stage1.run(tiny_config(**{**CONFIG, "train__steps": 9}), str(w))
    assert summary["step"] == 9
    warning = next(r.getMessage() for r in caplog.records if "step 6 is damaged" in r.getMessage())
    if checksums:
        assert any(rel in warning for rel in rels) and EXPECTED[how] in warning, warning
    else:
        assert "it cannot be read (" in warning, warning
    assert f"moved to {w / 'checkpoints_bad' / '6'}" in warning
    assert f"resumed from {w / 'checkpoints'} step 3" in caplog.text
    assert all((w / "checkpoints_bad" / "6" / rel).exists() for rel in rels) or how == "missing_metadata"  # kept
    assert sorted(int(n) for n in os.listdir(w / "checkpoints") if n.isdigit()) == [6, 9]  # 6 again, retrained


def test_no_readable_step_is_one_error_naming_the_folder(trained, tmp_path):
    w = _copy(trained, tmp_path)
    damage(w / "checkpoints" / "6", "random_bytes")
    damage(w / "checkpoints" / "3", "missing_metadata")
    with pytest.raises(CheckpointError) as e:
        stage1.run(tiny_config(**CONFIG), str(w))
    msg = str(e.value)
    assert f"no readable checkpoint in {w / 'checkpoints'}" in msg
    assert "step 6: params/" in msg and "step 3: params/_METADATA is missing" in msg
    assert "copy an intact checkpoint" in msg and "rerun the same command to train from step 0" in msg
    assert not (w / "checkpoints_bad").exists()  # nothing moved: the rerun says the same until the user acts
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        ckpt_lib.load_params(str(w), None)


def test_cli_no_readable_checkpoint_is_one_error_line(trained, tmp_path):
    w = _copy(trained, tmp_path)
    for s in (3, 6):
        damage(w / "checkpoints" / str(s), "cut_meta")
    over = {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 100}
    proc = run_main(w, over)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no readable checkpoint in {w / 'checkpoints'}: step 6: meta/"), last
    assert "Traceback" not in proc.stderr


def test_intact_step_that_does_not_fit_the_model_is_an_error_not_a_fallback(trained):
    """Files that match their checksums but do not restore onto the requested shapes (another vocabulary, say)
    are not damage: no fallback to an older step, one error naming the step and the settings to check."""
    import jax
    from pal_jax.training.experiment import Experiment
    abstract = Experiment(tiny_config(**CONFIG), str(trained), need_corpus=False).model.abstract
    leaves, treedef = jax.tree.flatten(abstract)
    leaves[0] = jax.ShapeDtypeStruct((leaves[0].shape[0] + 8, *leaves[0].shape[1:]), leaves[0].dtype,
                                     sharding=leaves[0].sharding)
    with pytest.raises(CheckpointError, match=r"step 6: its files match their checksums, but it cannot be restored"):
        ckpt_lib.load_params(str(trained), jax.tree.unflatten(treedef, leaves))
    assert sorted(int(n) for n in os.listdir(trained / "checkpoints") if n.isdigit()) == [3, 6]
