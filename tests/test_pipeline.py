"""The pipeline never serves stale results (issue 16, item 6): each phase records the inputs it was made from, and a
rerun redoes the phases whose inputs changed, naming the changed keys."""
from __future__ import annotations

import json
import logging
import os

import pytest
from helpers import tiny_config
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax import pipeline as pipeline_mode

SMALL = dict(train__steps=2, train__log_every=1, train__eval_every=2, train__checkpoint_every=2,
             stage2__steps=2, stage2__batch_size=8, stage2__warmup_steps=0, stage2__max_pair_turns=32,
             stage2__dev_fraction=0.3, predict__batch_size=8, predict__max_new_tokens=6, predict__max_records=8,
             predict__calibration_turns=16, data__synthetic_dialogues=30, eval__bootstrap_resamples=20,
             eval__sentence_encoder="")


def test_phase_inputs_leave_out_what_cannot_change_the_output_and_diff_by_key():
    c = tiny_config(**SMALL)
    s1 = pipeline_mode.phase_inputs(c, "stage1")
    assert "train.lr" in s1 and "model.d_model" in s1 and "train.log_every" not in s1 and "stage2.beta" not in s1
    assert not any(k.startswith("mesh.") for k in s1)
    s2 = pipeline_mode.phase_inputs(c, "stage2", {"stage1.step": 2})
    assert "stage2.beta" in s2 and "train.lr" not in s2 and s2["stage1.step"] == 2  # train.lr: stage2.lr there
    assert "stage2.beta" not in pipeline_mode.phase_inputs(c, "eval")
    more = dict(s1, **{"train.steps": 5})
    assert pipeline_mode.changed_inputs(s1, more, "train.steps") == []  # more steps: the phase continues
    assert pipeline_mode.changed_inputs(more, s1, "train.steps") == ["train.steps: 5 -> 2"]  # fewer: redone
    assert pipeline_mode.changed_inputs(s2, dict(s2, **{"stage2.beta": 0.2})) == ["stage2.beta: 0.1 -> 0.2"]
    # which records the evaluation reads (tune on dev, then test) is not a Stage 2 input, only an eval one
    assert "predict.split" not in s2 and "predict.max_records" not in s2 and "predict.batch_size" in s2
    assert pipeline_mode.phase_inputs(c, "eval")["predict.split"] == "test"
    # a key a phase no longer reads (a recorded input this code dropped) does not make the old output stale
    assert pipeline_mode.changed_inputs(dict(s2, **{"predict.split": "dev"}), s2) == []
    assert pipeline_mode.changed_inputs(s2, dict(s2, **{"stage2.new_key": 1})) == ["stage2.new_key: '<unset>' -> 1"]


def _run_logged(caplog, w: str, **overrides) -> str:
    """Run the pipeline on workdir w with SMALL + overrides; its INFO log as one string."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        pipeline_mode.run(tiny_config(**{**SMALL, **overrides}), w)
    return "\n".join(r.getMessage() for r in caplog.records)


# end to end, 47 s (the default suite keeps test_pipeline_runs_and_skips_finished_phases and the unit tests above)
@pytest.mark.slow
def test_rerun_redoes_the_phases_whose_inputs_changed(tmp_path, caplog):
    """Before: a rerun with another stage2.beta skipped every phase, and one with more Stage 1 steps continued
    Stage 1 but kept the Stage 2 model and the report made from the old Stage 1."""
    w = str(tmp_path)
    metrics = tmp_path / "eval" / "metrics.json"
    pipeline_mode.run(tiny_config(**SMALL), w)
    first = metrics.stat().st_mtime_ns

    log = _run_logged(caplog, w, stage2__beta=0.2)
    assert "pipeline: stage1 done" in log  # its inputs did not change
    assert "pipeline: redoing pairs + Stage 2: its inputs changed since it was made: stage2.beta: 0.1 -> 0.2;" in log
    assert f"moved to {tmp_path / 'stage2'}.stale-1" in log
    assert "pipeline: redoing the evaluation: its inputs changed since it was made: stage2.inputs:" in log
    assert ckpt_lib.load_meta(str(tmp_path / "stage2"))["config"]["stage2"]["beta"] == 0.2
    assert (tmp_path / "stage2.stale-1" / "pairs.jsonl").exists()  # the old output kept, never deleted
    second = metrics.stat().st_mtime_ns
    assert second != first

    log = _run_logged(caplog, w, stage2__beta=0.2, train__steps=3)
    assert "redoing Stage 1" not in log and "resumed from" in log  # more Stage 1 steps: Stage 1 continues
    assert "pipeline: redoing pairs + Stage 2: its inputs changed since it was made: stage1.inputs:" in log
    assert "stage1.step: 2 -> 3" in log
    assert "pipeline: redoing the evaluation" in log
    assert json.loads((tmp_path / "stage2" / pipeline_mode.INPUTS).read_text())["inputs"]["stage1.step"] == 3
    third = metrics.stat().st_mtime_ns
    assert third != second

    log = _run_logged(caplog, w, stage2__beta=0.2, train__steps=3)
    assert "redoing" not in log and "evaluation done" in log  # the same inputs: nothing redone
    assert metrics.stat().st_mtime_ns == third
    assert sorted(n for n in os.listdir(tmp_path) if "stale" in n) == ["eval.stale-1", "eval.stale-2",
                                                                      "stage2.stale-1", "stage2.stale-2"]
