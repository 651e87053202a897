"""The full PAL pipeline as one job: Stage 1 -> pairs -> Stage 2 -> Select-then-Generate evaluation of both
checkpoints on the held-out test split -> one report comparing them.

When Stage 1 starts from pretrained weights (init_from: a Hugging Face dir, a .gguf file or smollm2_gguf), the
evaluation also runs that base model without fine-tuning (report column `base`), prompted in its own chat format
when it has a ChatML template (predict.prompt_format auto; the Stage 1 and Stage 2 checkpoints read the plain
templates they were trained on). From random init (the tiny preset) there is no base column.

    WORKDIR/stage1/   Stage 1 run (checkpoints, tokenizer, metrics)
    WORKDIR/stage2/   pairs.jsonl and the Stage 2 run
    WORKDIR/eval/     metrics.json, report.md, report.png, predictions_<name>.jsonl

Each phase is skipped when its output exists (a finished run's last checkpoint, pairs_info.json, metrics.json), so
rerunning the same command after a crash continues where it stopped.

Never stale: each phase folder holds `pipeline_inputs.json`, written as the phase starts: the config keys that
phase reads (PHASE_KEYS) and what it was made from upstream (the Stage 1 / Stage 2 checkpoint step and the
fingerprint of that phase's inputs). On a rerun a phase whose inputs differ is redone: the log names the changed
keys (`stage2.beta: 0.1 -> 0.2`, `stage1.step: 6 -> 9`), and its old folder is moved to `<folder>.stale-N` (never
deleted). More steps (train.steps for Stage 1, stage2.steps for Stage 2) continue the phase instead; a changed
phase changes the fingerprint every later phase records, so they are redone too. A phase folder without the record
(written before records were kept) is redone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

from etils import epath

from pal_jax.core import atomic, preemption
from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.evaluation import evaluate
from pal_jax.evaluation.evaluate import REPORT_ROWS
from pal_jax.model.transformer import RUN_TIME_FIELDS
from pal_jax.training import make_pairs, stage1, stage2
from pal_jax.weights import init_from, tokenizers

MOVED_HEADER = "## What Stage 2 moved"
BASE = "base"  # the report's column for the pretrained model without fine-tuning


def _read(path: str) -> str:
    """The file's text, "" when it does not exist."""
    p = epath.Path(path)
    return p.read_text(encoding="utf-8") if p.exists() else ""


def what_moved(results: dict, differences: dict, s2_dir: str) -> list[str]:
    """Markdown lines: Stage 2 minus Stage 1 for every metric of the report (results: {name: {metric: value}};
    differences: the report's paired differences, {} for plain ones), with its paired bootstrap interval and
    whether the change is better, worse or not significant (and Stage 2 minus the base model when the report has
    one), how often each model selects no persona, and what the Stage 2 pairs were made of."""
    res, diffs = results, differences
    cols = [("stage1", "stage2")] + ([(BASE, "stage2")] if BASE in res else [])

    def cell(a, b, key, higher):
        d = diffs.get(f"{b} - {a}", {}).get(key)
        if d is None:  # a report without intervals: the plain difference
            if res[a].get(key) is None or res[b].get(key) is None:
                return None
            d = {"delta": res[b][key] - res[a][key], "lo": float("nan"), "hi": float("nan"), "significant": True}
        delta = d["delta"]
        iv = f" [{d['lo']:+.4f}, {d['hi']:+.4f}]" if math.isfinite(d["lo"]) else ""
        if higher is None:
            verdict = "-"
        elif not d["significant"]:
            verdict = "n.s."
        else:
            verdict = "=" if delta == 0 else ("yes" if (delta > 0) == higher else "no")
        return f"{delta:+.4f}{iv} | {verdict}"

    head = "| metric |" + "".join(f" {b} - {a} [95% CI] | better |" for a, b in cols)
    lines = ["", MOVED_HEADER, "", head, "| --- |" + " --- | --- |" * len(cols)]
    for key, label, higher in REPORT_ROWS:
        cells = [cell(a, b, key, higher) for a, b in cols]
        if cells[0] is None:
            continue
        lines.append(f"| {label} | " + " | ".join(c or "- | -" for c in cells) + " |")
    if diffs:
        lines += ["", "better: yes / no when the 95% interval of the difference (dialogues resampled) excludes 0; "
                  "n.s. when it contains 0."]
    names = [n for n in (BASE, "stage1", "stage2") if n in res]
    if all("selects_none" in res[n] for n in names):
        lines += ["", "Share of turns where the model selects `No personal description.`: "
                  + ", ".join(f"{n} {res[n]['selects_none']:.4f}" for n in names) + "."]
    info_path = make_pairs.info_path(s2_dir)
    if epath.Path(info_path).exists():
        info = json.loads(_read(info_path))
        acc = info.get("stage1_selection_accuracy")
        on = info.get("generate_on", "all")
        where = ("every turn" if on == "all" else
                 f"the {info.get('generate_turns')} turns whose gold reply draws on a persona sentence "
                 f"(stage2.generate_pairs_on={on})")
        rejected = {"persona_free": "the Stage 1 reply to the persona-free prompt",
                    "no_persona": "the Stage 1 reply with no persona", "highlighted":
                    "the Stage 1 reply with the labelled persona highlighted"}.get(info.get("rejected_from"),
                                                                                   "the Stage 1 persona-free reply")
        select_rej = ("the Stage 1 model's own pick" if info.get("select_rejected") == "own_pick"
                      else "the Stage 1 model's strongest other candidate")
        kept = info.get("identical_kept", 0)
        lines += ["", f"Stage 2 pairs ({info_path}): {info.get('generate_pairs', info['pairs'])} generate pairs "
                      f"(gold reply vs {rejected}, on {where}"
                      + ("; their prompts highlight the Stage 1 model's own Select pick, stage2.pair_highlight="
                         "own_pick" if (info.get("rules") or {}).get("highlight") == "own_pick" else "")
                      + (f"; {info['dropped_identical']} dropped as identical"
                         if (info.get("rules") or {}).get("identical", "drop") == "drop"
                         else "; identical ones kept, stage2.identical_pairs=keep")
                      + f") and {info.get('select_pairs', 0)} select pairs (labelled persona target vs {select_rej}) "
                      f"from {info['turns']} training turns"
                      + (f"; Stage 1 selection accuracy on those turns {acc:.4f}" if acc is not None else "")
                      + (f"; {kept} pairs have the same text on both sides (the model already right: they train the "
                         f"chosen-reply NLL and the alignment term only, stage2.identical_pairs=keep)" if kept else "")
                      + "."]
    return lines


def base_model(config) -> str | None:
    """The pretrained weights Stage 1 starts from (HF dir, .gguf, smollm2_gguf), or None (random init, or a
    pal_jax workdir: not a base model)."""
    if not config.init_from:
        return None
    return config.init_from if init_from.kind(config.init_from) in ("hf", "gguf") else None


INPUTS = "pipeline_inputs.json"
# config keys (dotted prefixes) each phase reads; the rest (mesh, logging cadence, checkpoint cadence) cannot change
# its output. Stage 2 trains with stage2.train_settings (train.* with steps, lr, batch_size, warmup_steps from stage2.*).
PHASE_KEYS = {
    "stage1": ("seed", "init_from", "data.", "tokenizer.", "model.", "lora.", "train."),
    "stage2": ("seed", "init_from", "data.", "tokenizer.", "model.", "lora.", "train.", "stage2.", "predict."),
    "eval": ("seed", "init_from", "data.", "tokenizer.", "predict.", "eval."),
}
_COSMETIC = ("train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
             "train.keep_checkpoints", "train.async_checkpoint", "train.profile_start", "train.profile_steps",
             "train.peak_tflops", "eval.checkpoints", "eval.output_dir") + tuple(
    # how the model is computed (model.attention): its implementations agree to float rounding, as two meshes do
    f"model.{k}" for k in RUN_TIME_FIELDS)
_VIA_STAGE2 = ("train.steps", "train.lr", "train.batch_size", "train.warmup_steps")  # replaced by stage2.* there
# which records the evaluation predicts on (predict.load_records): the pairs come from training turns, so these
# leave Stage 2 alone (tuning on predict.split=dev, then the same workdir on test, redoes only the evaluation)
_EVAL_RECORDS = ("predict.split", "predict.max_records", "predict.input")
CONTINUES = {"stage1": "train.steps", "stage2": "stage2.steps"}  # more steps: the phase continues


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def phase_inputs(config, phase: str, upstream: dict | None = None) -> dict:
    """{dotted key: value} of what `phase` reads from the config, plus `upstream` (e.g. stage1.step)."""
    flat = _flat(json.loads(config.to_json_best_effort()))
    keep = {k: v for k, v in flat.items() if k.startswith(PHASE_KEYS[phase]) or k in PHASE_KEYS[phase]}
    drop = _COSMETIC + (_VIA_STAGE2 + _EVAL_RECORDS if phase == "stage2" else ())
    keep = {k: v for k, v in keep.items() if k not in drop}
    keep.update(upstream or {})
    return dict(sorted(keep.items()))


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def changed_inputs(old: dict, new: dict, continues: str | None = None) -> list[str]:
    """'key: old -> new' for every input that differs (a larger `continues` value, more steps, is no change). A key
    only in `old` is one this code no longer reads for the phase, so it cannot make the old output stale."""
    out = []
    for k in sorted(new):
        a, b = old.get(k, "<unset>"), new[k]
        if a == b:
            continue
        if k == continues and isinstance(a, int) and isinstance(b, int) and b > a:
            continue
        out.append(f"{k}: {a!r} -> {b!r}")
    return out


def _has_output(phase_dir: str) -> bool:
    p = epath.Path(phase_dir)
    return p.is_dir() and any(x.name != INPUTS for x in p.iterdir())


def _recorded(phase_dir: str) -> dict | None:
    p = epath.Path(phase_dir) / INPUTS
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())["inputs"]
    except (ValueError, KeyError, TypeError):
        return None


def prepare_phase(phase: str, label: str, phase_dir: str, inputs: dict) -> bool:
    """Before a phase runs: if its folder holds output made from other inputs, move it aside (logging the changed
    keys) so the phase is redone; then record `inputs`. Returns whether the output was moved (redone)."""
    redo = None
    if _has_output(phase_dir):
        old = _recorded(phase_dir)
        if old is None:
            redo = [f"no readable {INPUTS} (made before input records were kept)"]
        else:
            redo = changed_inputs(old, inputs, CONTINUES.get(phase)) or None
    if mesh_lib.is_primary():
        if redo:
            n = 1
            while epath.Path(f"{phase_dir}.stale-{n}").exists():
                n += 1
            epath.Path(phase_dir).rename(f"{phase_dir}.stale-{n}")
            logging.warning("pipeline: redoing %s: its inputs changed since it was made: %s; the old output is moved "
                            "to %s.stale-%d", label, "; ".join(redo), phase_dir, n)
        epath.Path(phase_dir).mkdir(parents=True, exist_ok=True)
        atomic.write_json(epath.Path(phase_dir) / INPUTS, {"inputs": inputs, "fingerprint": fingerprint(inputs)},
                          indent=1)
    mesh_lib.sync(f"pipeline {phase} prepared")
    return bool(redo)


def _upstream(name: str, phase_dir: str) -> dict:
    """What a later phase was made from: the phase's checkpoint step and the fingerprint of its inputs."""
    rec = _recorded(phase_dir) or {}
    return {f"{name}.step": int(ckpt_lib.load_meta(phase_dir)["step"]), f"{name}.inputs": fingerprint(rec)}


def _finished(workdir: str, steps: int) -> bool:
    return ckpt_lib.Checkpointer.exists(workdir) and ckpt_lib.load_meta(workdir)["step"] >= steps


def run(config, workdir: str) -> dict:
    import ml_collections

    times = {}
    s1_dir, s2_dir, eval_dir = (os.fspath(epath.Path(workdir) / d) for d in ("stage1", "stage2", "eval"))

    t0 = time.time()
    prepare_phase("stage1", "Stage 1", s1_dir, phase_inputs(config, "stage1"))
    if _finished(s1_dir, config.train.steps):
        logging.info("pipeline: stage1 done (%s), inputs unchanged: skipping", s1_dir)
    else:
        logging.info("pipeline: phase 1/3: Stage 1 -> %s", s1_dir)
        if stage1.run(config, s1_dir).get("preempted"):
            return {"preempted": True, "phase": "stage1"}  # rerun the same command to continue
    times["stage1_s"] = time.time() - t0
    preemption.check("SIGTERM during Stage 1's last step (Stage 1 is complete; the next phase has not started)")

    t0 = time.time()
    c2 = ml_collections.ConfigDict(config.to_dict())
    c2.init_from = s1_dir
    up1 = _upstream("stage1", s1_dir)
    prepare_phase("stage2", "pairs + Stage 2", s2_dir, phase_inputs(config, "stage2", up1))
    if _finished(s2_dir, config.stage2.steps):
        logging.info("pipeline: stage2 done (%s), inputs unchanged: skipping", s2_dir)
    else:
        logging.info("pipeline: phase 2/3: pairs + Stage 2 -> %s", s2_dir)
        if stage2.run(c2, s2_dir).get("preempted"):
            return {"preempted": True, "phase": "stage2"}
    times["pairs_and_stage2_s"] = time.time() - t0
    preemption.check("SIGTERM during Stage 2's last step (Stage 2 is complete; evaluation has not started)")

    t0 = time.time()
    report = os.fspath(epath.Path(eval_dir) / "report.md")
    prepare_phase("eval", "the evaluation", eval_dir,
                  phase_inputs(config, "eval", {**up1, **_upstream("stage2", s2_dir)}))
    if epath.Path(eval_dir, "metrics.json").exists() and MOVED_HEADER in _read(report):
        logging.info("pipeline: evaluation done (%s), inputs unchanged: skipping", eval_dir)
        if mesh_lib.is_primary():
            print(_read(report))
        out = {"report": report}
    else:
        logging.info("pipeline: phase 3/3: Select then Generate evaluation -> %s", eval_dir)
        c3 = ml_collections.ConfigDict(config.to_dict())
        base = base_model(config)
        c3.tokenizer.path = tokenizers.stage1_tokenizer_path(c3.tokenizer.path, s1_dir)
        ev = evaluate.evaluate_checkpoints(c3, {**({BASE: base} if base else {}), "stage1": s1_dir, "stage2": s2_dir},
                                           eval_dir)
        out = {k: ev[k] for k in ("report", "metrics", "plot")}
        if mesh_lib.is_primary():  # multi-host: process 0 writes the report
            moved = what_moved(ev["results"], ev["analysis"].get("differences", {}), s2_dir)
            atomic.write_text(report, _read(report) + "\n".join(moved) + "\n")
            print("\n".join(moved))
        mesh_lib.sync("report written")
    times["eval_s"] = time.time() - t0
    logging.info("pipeline: %s", ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return {**out, **times}
