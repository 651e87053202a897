"""The full PAL pipeline as one job: Stage 1 -> pairs -> Stage 2 -> Select-then-Generate evaluation of both
checkpoints on the held-out test split -> one report comparing them.

    WORKDIR/stage1/   Stage 1 run (checkpoints, tokenizer, metrics)
    WORKDIR/stage2/   pairs.jsonl and the Stage 2 run
    WORKDIR/eval/     metrics.json, report.md, report.png, predictions_<name>.jsonl

Each phase is skipped when its output exists (a finished run's last checkpoint, pairs_info.json, metrics.json), so
rerunning the same command after a crash continues where it stopped.
"""
from __future__ import annotations

import logging
import os
import time

from pal_jax import checkpoint as ckpt_lib


def _finished(workdir: str, steps: int) -> bool:
    return ckpt_lib.Checkpointer.exists(workdir) and ckpt_lib.load_meta(workdir)["step"] >= steps


def run(config, workdir: str) -> dict:
    import ml_collections

    from pal_jax import evaluate, stage1, stage2
    times = {}
    s1_dir, s2_dir, eval_dir = (os.path.join(workdir, d) for d in ("stage1", "stage2", "eval"))

    t0 = time.time()
    if _finished(s1_dir, config.train.steps):
        logging.info("pipeline: stage1 done (%s), skipping", s1_dir)
    else:
        logging.info("pipeline: phase 1/3: Stage 1 -> %s", s1_dir)
        stage1.run(config, s1_dir)
    times["stage1_s"] = time.time() - t0

    t0 = time.time()
    c2 = ml_collections.ConfigDict(config.to_dict())
    c2.init_from = s1_dir
    if _finished(s2_dir, config.stage2.steps):
        logging.info("pipeline: stage2 done (%s), skipping", s2_dir)
    else:
        logging.info("pipeline: phase 2/3: pairs + Stage 2 -> %s", s2_dir)
        stage2.run(c2, s2_dir)
    times["pairs_and_stage2_s"] = time.time() - t0

    t0 = time.time()
    report = os.path.join(eval_dir, "report.md")
    if os.path.exists(os.path.join(eval_dir, "metrics.json")) and os.path.exists(report):
        logging.info("pipeline: evaluation done (%s), skipping", eval_dir)
        with open(report) as f:
            print(f.read())
        out = {"report": report}
    else:
        logging.info("pipeline: phase 3/3: Select then Generate evaluation -> %s", eval_dir)
        c3 = ml_collections.ConfigDict(config.to_dict())
        c3.eval.checkpoints = f"stage1={s1_dir},stage2={s2_dir}"
        c3.eval.output_dir = eval_dir
        c3.tokenizer.path = c3.tokenizer.path or os.path.join(s1_dir, "tokenizer")
        out = evaluate.run_evaluate(c3, workdir)
    times["eval_s"] = time.time() - t0
    logging.info("pipeline: %s", ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return {**out, **times}
