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

Shards keep each turn's candidate scores (`select_scores`), so the pairs can be rebuilt without the model.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax

from pal_jax.data import convai2, templates

SHARD = 256  # turns per shard


def pairs_path(workdir: str) -> str:
    return os.path.join(workdir, "pairs.jsonl")


def _atomic_write_lines(path: str, rows) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


GENERATE_ON = ("all", "persona")


def _pairs_of(row: dict, select_pairs: bool, generate_on: str = "all") -> list[dict]:
    """The pairs one decoded turn gives (see the module doc)."""
    base = {"id": row["id"], "persona": row["persona"], "history": row["history"],
            "persona_label": row["persona_label"]}
    out = []
    wanted = generate_on == "all" or (row["persona_label"] is not None and row["persona_label"] >= 0)
    if wanted and not _same(row["chosen"], row["rejected"]):
        out.append({**base, "kind": "generate", "chosen": row["chosen"], "rejected": row["rejected"]})
    label, scores = row["persona_label"], row.get("select_scores")
    if select_pairs and label is not None and scores is not None:
        n = len(row["persona"])
        others = [k for k in range(n + 1) if k != (label if label >= 0 else n)]
        worst = max(others, key=lambda k: scores[k])  # the strongest wrong candidate (first on ties)
        out.append({**base, "kind": "select", "chosen": templates.select_target(row["persona"], label),
                    "rejected": templates.select_target(row["persona"], -1 if worst == n else worst)})
    return out


def make_pairs(predictor, dialogues, workdir: str, seed: int, max_turns: int = 0, select_pairs: bool = True,
               generate_on: str = "all") -> dict:
    """Decode persona-free replies (and run the Select step, with select_pairs) for the turns of `dialogues` (the
    first max_turns; 0 = all) and write the pairs. Returns counts and paths."""
    if generate_on not in GENERATE_ON:
        raise ValueError(f"stage2.generate_pairs_on = {generate_on!r}: expected one of {GENERATE_ON}")
    out = pairs_path(workdir)
    info_path = os.path.join(workdir, "pairs_info.json")
    if os.path.exists(out) and os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        logging.info("pairs: %s exists (%d pairs); skipping", out, info["pairs"])
        return info
    records = convai2.records_from_dialogues(dialogues)
    if max_turns:
        records = records[:max_turns]
    shard_dir = os.path.join(workdir, "pairs")
    os.makedirs(shard_dir, exist_ok=True)
    n_shards = -(-len(records) // SHARD)
    t0, done_before = time.time(), 0
    for k in range(n_shards):
        path = os.path.join(shard_dir, f"part-{k:05d}.jsonl")
        if os.path.exists(path):
            done_before += 1
            continue
        chunk = records[k * SHARD:(k + 1) * SHARD]
        predictor.rng = jax.random.fold_in(jax.random.key(seed), k)
        replies = predictor.persona_free(chunk)
        picks = predictor.select(chunk) if select_pairs else [(None, None, None)] * len(chunk)
        _atomic_write_lines(path, ({"id": r.id, "persona": list(r.persona), "history": list(r.history),
                                    "persona_label": r.persona_label, "chosen": r.response, "rejected": reply,
                                    "selected": pick[0], "select_scores": pick[2]}
                                   for r, reply, pick in zip(chunk, replies, picks)))
        done = k + 1 - done_before
        eta = (time.time() - t0) / done * (n_shards - k - 1)
        logging.info("pairs: shard %d/%d (%d turns) ETA %.0fs", k + 1, n_shards, len(chunk), eta)
    rows = []
    for k in range(n_shards):
        with open(os.path.join(shard_dir, f"part-{k:05d}.jsonl"), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    if select_pairs and any(r.get("select_scores") is None for r in rows):
        raise ValueError(f"{shard_dir}: shards written without the Select step (by make_pairs with select_pairs "
                         f"off); expected every row to have 'select_scores'. Delete {shard_dir} to rebuild them")
    kept = [p for r in rows for p in _pairs_of(r, select_pairs, generate_on)]
    n_gen = sum(p["kind"] == "generate" for p in kept)
    eligible = [r for r in rows if generate_on == "all" or (r["persona_label"] is not None
                                                            and r["persona_label"] >= 0)]
    _atomic_write_lines(out, kept)
    labelled = [r for r in rows if r["persona_label"] is not None and r.get("selected") is not None]
    info = {"turns": len(rows), "pairs": len(kept), "generate_pairs": n_gen, "select_pairs": len(kept) - n_gen,
            "generate_on": generate_on, "generate_turns": len(eligible),
            "dropped_identical": len(eligible) - n_gen, "path": out, "seed": seed,
            "stage1_selection_accuracy": (sum(r["selected"] == r["persona_label"] for r in labelled) / len(labelled)
                                          if labelled else None)}
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(info_path + ".tmp", info_path)  # written last: its presence marks the pairs complete
    logging.info("pairs: %d turns -> %d generate pairs from %d %s turns (%d dropped: persona-free reply identical "
                 "to the gold one) + %d select pairs (Stage 1 selection accuracy %s) in %s", len(rows), n_gen,
                 len(eligible), generate_on, len(eligible) - n_gen, len(kept) - n_gen,
                 info["stage1_selection_accuracy"], out)
    return info


def read_pairs(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no preference pairs at {path}: expected the output of "
                                f"`python -m pal_jax.main --config=configs/make_pairs.py:PRESET --workdir=...`")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows, start=1):
        for key in ("persona", "history", "chosen", "rejected", "persona_label"):
            if key not in r:
                raise ValueError(f"{path}:{i}: missing key {key!r}; expected a pair written by make_pairs")
        r.setdefault("kind", "generate")
        if r["kind"] not in ("generate", "select"):
            raise ValueError(f"{path}:{i}: kind {r['kind']!r}; expected 'generate' or 'select'")
    return rows
