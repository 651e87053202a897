"""Preference pairs for Stage 2 (`make_pairs` mode).

Two kinds of pair, both built from the Stage 1 model's own outputs on the training turns:

- `generate` (PAL's pairs): the Stage 1 model replies from the *persona-free* prompt (history only): that reply is
  `rejected`, the gold reply is `chosen`, and the prompt Stage 2 optimises is the persona-conditioned generate
  prompt with the labelled persona. Pairs whose rejected reply equals the chosen one are dropped and counted.
  `generate_on` picks the turns: "all" (the paper) or "persona" (only turns whose gold reply draws on a persona
  sentence). On a turn that calls for no persona the persona-free reply is not a failure to use the persona,
  and the pair only pushes the policy away from fluent generic replies like the gold one (measured: on the
  synthetic corpus it cost the none-turns half of their F1).
- `select` (with `select_pairs`, the default): the Stage 1 model's Select step (the candidate scorer, as at
  inference) scores every persona sentence and `No personal description.` on the select prompt; chosen = the
  turn's labelled target (`k.<sentence>` or `No personal description.`), rejected = the best-scoring *other*
  candidate: the model's own pick where it is wrong, its runner-up where it is right. So both directions of
  the model's confusions (a persona where none is called for, none or the wrong sentence where one is) become
  pairs. Without them, Stage 2 has no signal on the Select step, and Select-then-Generate conditions every reply
  on whatever Stage 1 selects.

Where a generate pair's rejected reply comes from (`rejected_from`, config stage2.rejected), always the Stage 1
model's own greedy reply to:
- "persona_free" (the paper): the persona-free prompt (history only);
- "no_persona": the generate prompt with no persona sentence at all and "none" highlighted, the format Stage 1
  trains on for turns that call for no persona (a model that never saw the persona-free format, like the tiny
  preset's, answers that one with text that is not a reply at all, an easy rejected side that teaches nothing
  about the persona);
- "highlighted": the generate prompt with the labelled persona highlighted, the very prompt Stage 2 optimises:
  the model's own attempt at using the persona, so the pair shows its actual failure (the right form with a wrong
  fact, say); where that attempt equals the gold reply the pair is dropped, as identical.

Which pairs are kept (both decided from the decoded shards, so changing them rebuilds pairs.jsonl without
decoding again):
- `identical` (config stage2.identical_pairs): "drop" (default) leaves out a generate pair whose rejected reply
  equals the gold one; "keep" keeps it. On such a pair the DPO margin is identically 0 (the same tokens after the
  same prompt on both sides), so its DPO gradient is zero (up to float rounding: a gradient norm of 5e-8 on the
  tiny model) and it trains only the chosen-reply NLL (stage2.sft_weight) and the alignment term: with
  `rejected=highlighted` the turns the model already gets right are replayed beside the DPO pairs of the turns it
  gets wrong, instead of Stage 2 seeing only its failures;
- `select_rejected` (config stage2.select_rejected): a select pair's rejected side is the strongest *other*
  candidate ("runner_up", default: the model's own pick where it is wrong, its runner-up where it is right) or
  the model's own pick ("own_pick": identical to the chosen target where the pick is right, so such a pair is
  kept only with identical="keep", as replay).

Which persona sentence a generate pair's prompt highlights (`highlight`, config stage2.pair_highlight): the turn's
label ("label", default: the paper's persona-conditioned prompt) or the Stage 1 model's own Select pick on that turn
("own_pick": the prompt the model will see at inference, where Select then Generate highlights its own pick; where
the Select step cannot select, e.g. answers "none" on every turn, the generate pairs then teach the reply to draw on
the persona list itself). Needs the Select step in the shards (run whenever select_pairs or own_pick is on); not
with rejected="highlighted", whose rejected replies were decoded with the label highlighted.

Shards keep each turn's candidate scores (`select_scores`), so the pairs can be rebuilt without the model, and
the `rejected_from` they were decoded with.

Multi-host: every process decodes every shard (the model is sharded over all of them); process 0 decides which
shards are missing and writes the files; the others wait for it and read pairs_info.json. Paths go through
etils.epath, so the workdir may be gs://... .
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from etils import epath

from pal_jax.core import atomic, preemption
from pal_jax.core import mesh as mesh_lib
from pal_jax.data import convai2, preferences, templates
from pal_jax.inference.predictor import Record

SHARD = 256  # turns per shard


def pairs_path(workdir: str) -> str:
    return os.fspath(epath.Path(os.fspath(workdir)) / "pairs.jsonl")


def info_path(workdir: str) -> str:
    """pairs_info.json: the counts and settings of make_pairs' pairs.jsonl, written last (it marks them complete)."""
    return os.fspath(epath.Path(os.fspath(workdir)) / "pairs_info.json")


def _read_lines(path) -> list[dict]:
    return [json.loads(line) for line in epath.Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


GENERATE_ON = ("all", "persona")
REJECTED_FROM = ("persona_free", "no_persona", "highlighted")
IDENTICAL = ("drop", "keep")
SELECT_REJECTED = ("runner_up", "own_pick")
HIGHLIGHT = ("label", "own_pick")


def rejected_replies(predictor, records, rejected_from: str) -> list[str]:
    """The Stage 1 model's replies that become the rejected side of generate pairs (the module doc)."""
    if rejected_from == "persona_free":
        return predictor.persona_free(records)
    if rejected_from == "highlighted":
        return predictor.generate(records, [-1 if r.persona_label is None else r.persona_label for r in records])
    if rejected_from == "no_persona":
        return predictor.generate([Record(persona=(), history=tuple(r.history)) for r in records], [-1] * len(records))
    raise ValueError(f"stage2.rejected = {rejected_from!r}: expected one of {REJECTED_FROM}")


def _needs_select(select_pairs: bool, highlight: str) -> bool:
    """Whether the shards need the Select step: for select pairs, or for generate prompts that show its pick."""
    return select_pairs or highlight == "own_pick"


def _gives_generate(persona_label, generate_on: str) -> bool:
    """Whether a turn with this persona label gives a generate pair (and so needs a persona-free reply)."""
    return generate_on == "all" or (persona_label is not None and persona_label >= 0)


def _pairs_of(row: dict, select_pairs: bool, generate_on: str = "all", identical: str = "drop",
              select_rejected: str = "runner_up", highlight: str = "label") -> list[dict]:
    """The pairs one decoded turn gives (see the module doc)."""
    base = {"id": row["id"], "persona": row["persona"], "history": row["history"],
            "persona_label": row["persona_label"]}
    out = []
    if (_gives_generate(row["persona_label"], generate_on) and row["rejected"] is not None
            and (identical == "keep" or not _same(row["chosen"], row["rejected"]))):
        # a generate pair's persona_label is the sentence its prompt highlights
        shown = row["selected"] if highlight == "own_pick" else row["persona_label"]
        out.append({**base, "persona_label": shown, "kind": "generate", "chosen": row["chosen"],
                    "rejected": row["rejected"]})
    label, scores = row["persona_label"], row.get("select_scores")
    if select_pairs and label is not None and scores is not None:
        n = len(row["persona"])
        if select_rejected == "own_pick":
            rejected = row["selected"]  # the model's own choice (-1: "none"), by the Select step's rule
        else:
            others = [k for k in range(n + 1) if k != (label if label >= 0 else n)]
            worst = max(others, key=lambda k: scores[k])  # the strongest wrong candidate (first on ties)
            rejected = -1 if worst == n else worst
        if identical == "keep" or rejected != label:
            out.append({**base, "kind": "select", "chosen": templates.select_target(row["persona"], label),
                        "rejected": templates.select_target(row["persona"], rejected)})
    return out


def make_pairs(predictor, dialogues, workdir: str, seed: int, max_turns: int = 0, select_pairs: bool = True,
               generate_on: str = "all", rejected_from: str = "persona_free", identical: str = "drop",
               select_rejected: str = "runner_up", highlight: str = "label") -> dict:
    """Decode the rejected replies (`rejected_from`, the module doc) and run the Select step (with select_pairs)
    for the turns of `dialogues` (the first max_turns; 0 = all) and write the pairs. Returns counts and paths.
    Pairs already written with other keep rules (select_pairs, generate_on, identical, select_rejected, highlight)
    are rebuilt from the decoded shards."""
    if generate_on not in GENERATE_ON:
        raise ValueError(f"stage2.generate_pairs_on = {generate_on!r}: expected one of {GENERATE_ON}")
    if rejected_from not in REJECTED_FROM:
        raise ValueError(f"stage2.rejected = {rejected_from!r}: expected one of {REJECTED_FROM}")
    if identical not in IDENTICAL:
        raise ValueError(f"stage2.identical_pairs = {identical!r}: expected one of {IDENTICAL}")
    if select_rejected not in SELECT_REJECTED:
        raise ValueError(f"stage2.select_rejected = {select_rejected!r}: expected one of {SELECT_REJECTED}")
    if highlight not in HIGHLIGHT or (highlight == "own_pick" and rejected_from == "highlighted"):
        raise ValueError(f"stage2.pair_highlight = {highlight!r}: expected one of {HIGHLIGHT}, and 'label' with "
                         f"stage2.rejected='highlighted' (its rejected replies are decoded with the label highlighted)")
    records = convai2.records_from_dialogues(dialogues)
    if max_turns:
        records = records[:max_turns]
    rules = {"turns": len(records), "select_pairs": select_pairs, "generate_on": generate_on,
             "identical": identical, "select_rejected": select_rejected, "highlight": highlight}
    root = epath.Path(os.fspath(workdir))
    out = pairs_path(workdir)
    info_file = epath.Path(info_path(workdir))
    primary = mesh_lib.is_primary()
    finished = bool(mesh_lib.broadcast(np.asarray(epath.Path(out).exists() and info_file.exists(), np.int32)))
    if finished:
        info = json.loads(info_file.read_text())
        # pairs written before the keep rules were recorded: the rules of that time (runner-up, identical dropped)
        made = info.get("rules") or {"turns": info["turns"], "select_pairs": info.get("select_pairs", 0) > 0,
                                     "generate_on": info.get("generate_on", "all"), "identical": "drop",
                                     "select_rejected": "runner_up"}
        made = {"highlight": "label", **made}  # pairs written before stage2.pair_highlight existed
        if made == rules:
            logging.info("pairs: %s exists (%d pairs); skipping", out, info["pairs"])
            return info
        changed = ", ".join(f"{k} {made[k]!r} -> {rules[k]!r}" for k in rules if made[k] != rules[k])
        logging.info("pairs: %s was built with other settings (%s); rebuilding it from the decoded shards (turns "
                     "not decoded yet are decoded first)", out, changed)
    shard_dir = root / "pairs"
    n_shards = -(-len(records) // SHARD)
    shard = [os.fspath(shard_dir / f"part-{k:05d}.jsonl") for k in range(n_shards)]
    if primary:
        shard_dir.mkdir(parents=True, exist_ok=True)
    # which shards exist: process 0's view, so every process decodes the same shards (the decoding is collective)
    # a shard written for a smaller stage2.max_pair_turns may hold fewer turns than this run wants: decoded again
    have = mesh_lib.broadcast(np.asarray([_shard_rows(p) >= len(records[k * SHARD:(k + 1) * SHARD])
                                          for k, p in enumerate(shard)] or [False], np.int32))
    t0, done_before = time.time(), 0
    for k in range(n_shards):
        if have[k]:
            done_before += 1
            continue
        with preemption.phase(f"make_pairs (shard {k + 1}/{n_shards} abandoned, not written; the shards before "
                              f"it are kept in {os.fspath(shard_dir)})"):
            _make_shard(predictor, records, k, seed, generate_on, rejected_from, _needs_select(select_pairs, highlight),
                        primary, shard[k])
        done = k + 1 - done_before
        eta = (time.time() - t0) / done * (n_shards - k - 1)
        logging.info("pairs: shard %d/%d (%d turns) ETA %.0fs", k + 1, n_shards,
                     len(records[k * SHARD:(k + 1) * SHARD]), eta)
    if not primary:
        mesh_lib.sync("pairs written")  # process 0 writes pairs.jsonl and pairs_info.json
        return json.loads(info_file.read_text())
    with preemption.phase("make_pairs (writing pairs.jsonl; the decoded shards are kept)"):
        info = _finish(shard, out, info_file, seed, rejected_from, rules)
    mesh_lib.sync("pairs written")
    return info


def _make_shard(predictor, records, k: int, seed: int, generate_on: str, rejected_from: str, run_select: bool,
                primary: bool, path: str) -> None:
    """Decode shard k and write it (process 0) whole under its final name, or not at all."""
    chunk = records[k * SHARD:(k + 1) * SHARD]
    predictor.rng = jax.random.fold_in(jax.random.key(seed), k)
    # rejected replies only where a generate pair can come of them (rejected = None elsewhere)
    wanted = [_gives_generate(r.persona_label, generate_on) for r in chunk]
    decoded = iter(rejected_replies(predictor, [r for r, w in zip(chunk, wanted) if w], rejected_from)
                   if any(wanted) else [])
    replies = [next(decoded) if w else None for w in wanted]
    picks = predictor.select(chunk) if run_select else [(None, None, None)] * len(chunk)
    if primary:
        atomic.write_jsonl(path, ({"id": r.id, "persona": list(r.persona), "history": list(r.history),
                                    "persona_label": r.persona_label, "chosen": r.response, "rejected": reply,
                                    "selected": pick[0], "select_scores": pick[2], "rejected_from": rejected_from}
                                   for r, reply, pick in zip(chunk, replies, picks)))


def _shard_rows(path: str) -> int:
    """Turns in a decoded shard (0 when it is missing), counted without parsing them."""
    p = epath.Path(path)
    return sum(1 for line in p.read_text(encoding="utf-8").split("\n") if line.strip()) if p.exists() else 0


def _finish(shard: list[str], out: str, info_file, seed: int, rejected_from: str, rules: dict) -> dict:
    """The pairs of the first rules["turns"] decoded turns -> pairs.jsonl, kept by `rules` (make_pairs: the turn
    count, select_pairs, generate_on, identical, select_rejected, highlight), then pairs_info.json (written last: it
    marks them done)."""
    select_pairs, generate_on = rules["select_pairs"], rules["generate_on"]
    identical, select_rejected, highlight = rules["identical"], rules["select_rejected"], rules["highlight"]
    shard_dir = os.path.dirname(shard[0]) if shard else ""
    rows = []
    for path in shard:
        rows += _read_lines(path)
    rows = rows[:rules["turns"]]  # the last shard may hold turns past this run's stage2.max_pair_turns
    if _needs_select(select_pairs, highlight) and any(r.get("select_scores") is None for r in rows):
        raise ValueError(f"{shard_dir}: shards written without the Select step (by make_pairs with select_pairs "
                         f"off and stage2.pair_highlight='label'); expected every row to have 'select_scores' "
                         f"(select pairs and pair_highlight='own_pick' need it). Delete {shard_dir} to rebuild them")
    made = {r.get("rejected_from", "persona_free") for r in rows}
    if made - {rejected_from}:
        raise ValueError(f"{shard_dir}: shards decoded with stage2.rejected={sorted(made)}, not {rejected_from!r}; "
                         f"delete {shard_dir} to rebuild them")
    eligible = [r for r in rows if _gives_generate(r["persona_label"], generate_on)]
    if any(r["rejected"] is None for r in eligible):
        raise ValueError(f"{shard_dir}: shards decoded with fewer persona-free replies than "
                         f"stage2.generate_pairs_on={generate_on!r} needs (made with generate_pairs_on=persona); "
                         f"delete {shard_dir} to rebuild them")
    kept = [p for r in rows for p in _pairs_of(r, select_pairs, generate_on, identical, select_rejected, highlight)]
    n_gen = sum(p["kind"] == "generate" for p in kept)
    n_same = sum(_same(p["chosen"], p["rejected"]) for p in kept)
    atomic.write_jsonl(out, kept)
    labelled = [r for r in rows if r["persona_label"] is not None and r.get("selected") is not None]
    info = {"turns": len(rows), "pairs": len(kept), "generate_pairs": n_gen, "select_pairs": len(kept) - n_gen,
            "generate_on": generate_on, "generate_turns": len(eligible), "rejected_from": rejected_from,
            "dropped_identical": len(eligible) - n_gen, "identical_kept": n_same, "select_rejected": select_rejected,
            "path": out, "seed": seed, "rules": rules,
            "stage1_selection_accuracy": (sum(r["selected"] == r["persona_label"] for r in labelled) / len(labelled)
                                          if labelled else None)}
    atomic.write_json(info_file, info)  # written last: its presence marks the pairs complete
    logging.info("pairs: %d turns -> %d generate pairs from %d %s turns (%d dropped: %s reply identical to the "
                 "gold one; prompts highlight the %s) + %d select pairs (rejected: %s; Stage 1 selection accuracy %s); "
                 "%d pairs identical on both sides kept (stage2.identical_pairs=%s: they train the NLL and alignment "
                 "terms only) in %s", len(rows), n_gen, len(eligible), generate_on, len(eligible) - n_gen,
                 rejected_from, "Stage 1 pick" if highlight == "own_pick" else "label", len(kept) - n_gen,
                 select_rejected, info["stage1_selection_accuracy"], n_same, identical, out)
    return info


def read_pairs(path: str, labeler=None, chat_template=None) -> list[dict]:
    """The pairs of a preference JSONL file: make_pairs' pairs.jsonl or the user's (stage2.pairs), in the persona
    form or TRL's conversational form, validated line by line (data/preferences.py; labeler and chat_template as
    there)."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"no preference pairs at {path}: expected the output of "
                                f"`python -m pal_jax.main --config=configs/make_pairs.py:PRESET --workdir=...`")
    return preferences.read_preferences(path, labeler=labeler, chat_template=chat_template)
