"""From dialogues to fixed-shape training batches.

1. `stage1_examples`: one select and one generate example per turn (prompt parts + target text).
2. `encode_examples`: prompt parts and target are tokenised separately and concatenated (prompt, target, eos), so
   the prompt/target boundary is exact. Too long for max_len (`fit_prompt`): the oldest history lines go first
   (never the last, the partner's message), then the start of the last line, then the head from the left; the
   target is never cut (an example whose target + eos leaves fewer than
   MIN_PROMPT tokens for the prompt is dropped).
3. `BatchSource`: rows grouped into length buckets; `batch(step)` is a pure function of (seed, step): epoch =
   step // steps_per_epoch, one seeded permutation per epoch (np.random.default_rng([seed, epoch])), so a resumed
   run sees exactly the batches it would have seen. `eval_batches()` yields every example once, in a fixed order.
   Multi-host: `batch(step, rows_of)` builds only the rows of the global batch that `rows_of(n_rows)` names (this
   process's slice, mesh.process_rows); the row order and the bucket length are those of the global batch.
4. `PackedBatchSource` (data.packing, Stage 1): the same epochs packed several examples to a row (segment ids,
   positions restarting at 0), the loss and its gradients unchanged; see its doc.

A row of an example with ids x[0..n-1] (n = prompt + target + 1): inputs = x[:-1], targets = x[1:], weight 1 on
the positions whose target is a target token (the target text or its eos), i.e. t in [prompt_len - 1, n - 2].
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator, Sequence

import numpy as np

from pal_jax.data import labels, templates
from pal_jax.data.templates import PromptParts

TASKS = ("select", "generate")
SELECT = TASKS.index("select")
MIN_PROMPT = 8  # an example keeps at least this many prompt tokens, or is dropped


@dataclasses.dataclass
class Example:
    task: str  # "select" | "generate"
    prompt: PromptParts
    target: str
    meta: dict  # dialogue_id, turn, label


def stage1_examples(dialogues) -> list[Example]:
    """Per turn: select (target 'k.<sentence>' or NONE_PERSONA) then generate (highlighted labelled persona,
    target the gold response). Every turn needs a persona_label (labels.label_dialogues fills unknown ones)."""
    out = []
    for d in dialogues:
        for i, t in enumerate(d.turns):
            label = t.persona_label
            if label is None:
                raise ValueError(f"{d.source}: turn {i} of dialogue {d.dialogue_id} has persona_label None; expected "
                                 f"labels on every turn (run labels.label_dialogues first)")
            if not -1 <= label < len(d.persona):
                raise ValueError(f"{d.source}: turn {i} of dialogue {d.dialogue_id} has persona_label {label}; "
                                 f"expected -1 or an index in [0, {len(d.persona) - 1}]")
            history = d.history(i)
            meta = {"dialogue_id": d.dialogue_id, "turn": i, "label": label}
            highlight = d.persona[label] if label >= 0 else None
            out.append(Example("select", templates.select_prompt(d.persona, history),
                               templates.select_target(d.persona, label), dict(meta)))
            out.append(Example("generate", templates.generate_prompt(d.persona, history, highlight),
                               t.response, dict(meta, highlight=highlight)))
    return out


@dataclasses.dataclass
class Encoded:
    ids: list[np.ndarray]  # int32 prompt + target + eos ids per example
    prompt_len: list[int]
    task: np.ndarray  # int32 task id per example (TASKS.index(task))
    n_truncated: int  # examples whose prompt was cut to fit (fit_prompt)
    n_dropped: int  # examples that could not fit even with a minimal prompt (target never cut)
    pad_id: int = 0
    index: np.ndarray | None = None  # int64: position in the input examples list of each kept example
    # float32 loss weight of each target token (target + eos) per example; None = 1 on every target token
    target_weights: list[np.ndarray] | None = None
    n_persona_tokens: int = 0  # target tokens given persona_weight (persona_token_ids)

    def __len__(self) -> int:
        return len(self.ids)


MIN_LAST_LINE = 16  # tokens of the last history line (the partner's latest words) kept before the head is cut


@dataclasses.dataclass
class Cuts:
    """What fit_prompt cut from one prompt; all 0 (false) when it fitted whole."""
    history_lines: int = 0  # oldest history lines dropped (never the last one)
    last_line_tokens: int = 0  # tokens cut from the start of the last history line (its latest words stay)
    head_tokens: int = 0  # tokens cut from the start of what was left (the head first)

    def __bool__(self) -> bool:
        return bool(self.history_lines or self.last_line_tokens or self.head_tokens)


def fit_prompt(head: list[int], history: Sequence[list[int]], tail: list[int], budget: int) -> tuple[list[int], Cuts]:
    """Concatenate head + history + tail within `budget` tokens. Cut, in this order, until it fits: the oldest
    history lines but the last; the start of the last line (the partner's message: its latest words stay, at least
    MIN_LAST_LINE tokens of it); then the start of the whole (the head). Returns (ids, what was cut)."""
    if budget < 1:
        raise ValueError(f"prompt budget {budget}; expected >= 1 token")
    cuts = Cuts()
    total = len(head) + sum(len(h) for h in history) + len(tail)
    while total > budget and cuts.history_lines < len(history) - 1:
        total -= len(history[cuts.history_lines])
        cuts.history_lines += 1
    kept = list(history[cuts.history_lines:])
    if total > budget and kept:  # the last line alone is too long: keep its end
        last = kept[-1]
        keep = max(budget - len(head) - len(tail), min(len(last), MIN_LAST_LINE))
        if keep < len(last):
            cuts.last_line_tokens = len(last) - keep
            kept[-1] = last[len(last) - keep:]
    ids = list(head)
    for h in kept:
        ids += h
    ids += tail
    if len(ids) > budget:
        cuts.head_tokens = len(ids) - budget
        ids = ids[len(ids) - budget:]
    return ids, cuts


def encode_prompt(parts: PromptParts, tokenizer, budget: int) -> list[int]:
    """The prompt's ids within `budget` tokens (fit_prompt), as encode_examples builds them."""
    return encode_prompt_cuts(parts, tokenizer, budget)[0]


def encode_prompt_cuts(parts: PromptParts, tokenizer, budget: int) -> tuple[list[int], Cuts]:
    """encode_prompt, with what fit_prompt cut."""
    return fit_prompt(tokenizer.encode(parts.head) if parts.head else [],
                      [tokenizer.encode(h) for h in parts.history], tokenizer.encode(parts.tail), budget)


def persona_token_ids(tokenizer, sentence: str, cache: dict | None = None) -> frozenset[int]:
    """The ids of the tokens that spell the content words of a persona sentence (labels.content_words: no
    stopwords, no punctuation), as they appear inside a sentence (' word') and at its start ('word'). A target
    token with one of these ids states the highlighted persona's words."""
    cache = {} if cache is None else cache
    out: set[int] = set()
    for w in re.findall(r"[a-z0-9']+", sentence.lower()):
        if not labels.content_words(w):
            continue
        if w not in cache:
            cache[w] = set(tokenizer.encode(" " + w)) | set(tokenizer.encode(w))
        out |= cache[w]
    return frozenset(out)


def encode_examples(examples: Sequence[Example], tokenizer, max_len: int,
                    persona_weight: float = 1.0) -> Encoded:
    """Tokenise examples into prompt + target + eos rows of at most max_len tokens (see the module doc).

    persona_weight: the loss weight of the target tokens that state the highlighted persona sentence (generate
    examples with a persona; persona_token_ids), every other target token 1. 1 = plain NLL. Upweighting them
    puts more of the gradient on copying the persona's words into the reply, which the tiny model otherwise
    learns last (docs/method.md)."""
    if not persona_weight > 0 or not np.isfinite(persona_weight):
        raise ValueError(f"encode_examples: persona_weight = {persona_weight}; expected a finite number > 0")
    if max_len < MIN_PROMPT + 2:
        raise ValueError(f"encode_examples: max_len = {max_len}; expected >= {MIN_PROMPT + 2}")
    # Tokenise each distinct string once (history lines and persona blocks repeat across turns and tasks).
    strings: dict[str, int] = {}
    for ex in examples:
        for s in (ex.prompt.head, *ex.prompt.history, ex.prompt.tail, ex.target):
            strings.setdefault(s, len(strings))
    keys = list(strings)
    encoded = tokenizer.encode_batch(keys) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(s)
                                                                                       for s in keys]
    table = {s: ids for s, ids in zip(keys, encoded)}
    table[""] = []
    eos = [tokenizer.eos_id]
    ids_out, plen, tasks, index, weights = [], [], [], [], []
    n_trunc = n_drop = n_persona = 0
    word_cache: dict = {}
    for n, ex in enumerate(examples):
        if ex.task not in TASKS:
            raise ValueError(f"example {n}: task {ex.task!r}; expected one of {TASKS}")
        target = table[ex.target] + eos
        budget = max_len - len(target)
        if budget < MIN_PROMPT:
            n_drop += 1
            continue
        prompt, cut = fit_prompt(table[ex.prompt.head], [table[h] for h in ex.prompt.history],
                                 table[ex.prompt.tail], budget)
        n_trunc += bool(cut)
        ids_out.append(np.asarray(prompt + target, np.int32))
        plen.append(len(prompt))
        tasks.append(TASKS.index(ex.task))
        index.append(n)
        if persona_weight != 1.0:
            w = np.ones(len(target), np.float32)
            highlight = ex.meta.get("highlight") if ex.task == "generate" else None
            if highlight:
                keep = persona_token_ids(tokenizer, highlight, word_cache)
                hit = np.fromiter((t in keep for t in target), bool, len(target))
                w[hit] = persona_weight
                n_persona += int(hit.sum())
            weights.append(w)
    return Encoded(ids=ids_out, prompt_len=plen, task=np.asarray(tasks, np.int32), n_truncated=n_trunc,
                   n_dropped=n_drop, pad_id=int(tokenizer.pad_id), index=np.asarray(index, np.int64),
                   target_weights=weights if persona_weight != 1.0 else None, n_persona_tokens=n_persona)


WINDOW_MULTIPLE = 16


def target_window(target_counts) -> int:
    """The loss window of a data source: its longest target (in weighted positions), rounded up to a multiple of
    16. One value per source keeps one compiled shape per length bucket."""
    longest = max((int(n) for n in target_counts), default=1)
    return max(WINDOW_MULTIPLE, -(-longest // WINDOW_MULTIPLE) * WINDOW_MULTIPLE)


def add_window(batch: dict, starts: np.ndarray, window: int) -> dict:
    """Add the target window of each row: win_idx [B, W] (positions starts[b] .. starts[b] + W - 1, clipped to
    the row) and win_targets / win_weights gathered there (0 weight where clipped), W = min(window, L). The
    losses run the LM head on these W positions only, not on all L: every weighted position lies in the window,
    because the window is at least the longest target of the source."""
    L = batch["targets"].shape[1]
    W = min(window, L)
    idx = starts[:, None].astype(np.int64) + np.arange(W)[None, :]
    inside = idx < L
    idx = np.minimum(idx, L - 1).astype(np.int32)
    w = np.take_along_axis(batch["weights"], idx, axis=1) * inside
    assert np.isclose(w.sum(), batch["weights"].sum()), "a target token fell outside the loss window"
    batch.update(win_idx=idx, win_targets=np.take_along_axis(batch["targets"], idx, axis=1),
                 win_weights=w.astype(np.float32))
    return batch


FLAT_MULTIPLE = 8


def _flat_groups(n_rows: int, group: int) -> int:
    """How many groups of `group` consecutive rows n_rows make; a named error unless `group` divides them."""
    if group < 1 or n_rows % group:
        raise ValueError(f"{n_rows} rows in groups of {group}: expected a group size >= 1 that divides the rows")
    return n_rows // group


def flat_width(row_targets: np.ndarray, group: int, cap: int) -> int:
    """Positions per row of a flat loss window (add_flat_window) for a batch whose rows have these target counts
    (all rows of the batch, in order): the fullest group of `group` consecutive rows, spread over its rows, rounded
    up to a multiple of 8, at most `cap` (the row window: every row fits in it, so every group fits in group x cap)."""
    need = np.asarray(row_targets, np.int64)
    fullest = int(need.reshape(_flat_groups(len(need), group), group).sum(axis=1).max(initial=0))
    per_row = -(-fullest // group)
    return int(min(cap, max(FLAT_MULTIPLE, -(-per_row // FLAT_MULTIPLE) * FLAT_MULTIPLE)))


def add_flat_window(batch: dict, group: int, width: int, weight_keys: dict[str, str], rows=None) -> dict:
    """The loss window as one list of target positions per group of `group` consecutive rows, instead of
    add_window's W positions per row, which are padding wherever a row's targets are shorter than the longest.

    Every position where one of weight_keys (e.g. {"weights": "win_weights"}) is non-zero is listed once, row by
    row, as row_in_group * L + position; the group's list is padded to group * width entries (index 0, weight 0)
    and laid out over its rows as [group, width]. Adds win_idx / win_targets / win_row (the entry's row in its
    group) and each weight key's window, all [R, width], and win_group [R, group]: the batch rows of each row's
    group (rows: the batch row of each built row, for a process building only its slice; default 0..R-1). The
    losses (model.logprobs.flat_window_sums) gather [R / group, group * width] entries within each group, so a
    group must not straddle devices: group = the rows of one data shard."""
    R, L = batch["targets"].shape
    rows = np.arange(R) if rows is None else np.asarray(rows, np.int64)
    G, M = _flat_groups(R, group), group * width
    on = np.zeros((R, L), bool)
    for key in weight_keys:
        on |= np.asarray(batch[key]) != 0
    idx, inside = np.zeros((G, M), np.int64), np.zeros((G, M), bool)
    for g in range(G):
        flat = np.flatnonzero(on[g * group:(g + 1) * group].reshape(-1))  # row-major: row * L + position
        if len(flat) > M:
            raise ValueError(f"rows {g * group}..{(g + 1) * group - 1}: {len(flat)} target positions, more than the "
                             f"window's {group} x {width}; expected a width from flat_width over the whole batch")
        idx[g, :len(flat)], inside[g, :len(flat)] = flat, True
    gathered = {k: np.take_along_axis(np.asarray(batch[k]).reshape(G, group * L), idx, axis=1)
                for k in ("targets", *weight_keys)}
    shape = (R, width)
    out = {"win_idx": idx.reshape(shape).astype(np.int32), "win_row": (idx // L).reshape(shape).astype(np.int32),
           "win_targets": gathered["targets"].reshape(shape).astype(np.int32),
           "win_group": np.repeat(rows.reshape(G, group), group, axis=0).astype(np.int32)}
    for key, name in weight_keys.items():
        w = gathered[key] * inside
        assert np.isclose(w.sum(), np.asarray(batch[key]).sum()), "a target token fell outside the flat window"
        out[name] = w.reshape(shape).astype(np.float32)
    batch.update(out)
    return batch


def group_by_bucket(items: np.ndarray, bucket: np.ndarray, n_buckets: int, B: int):
    """Batches of B items, bucket by bucket (the smallest first), the leftovers of a bucket moving up into the
    next one; items keep their order within a bucket. -> (batches, the < B items left after the last bucket)."""
    batches, carry = [], np.zeros(0, np.int64)
    items = np.asarray(items, np.int64)
    for b in range(n_buckets):
        pool = np.concatenate([carry, items[bucket == b]])
        full = len(pool) // B
        batches += [pool[k * B:(k + 1) * B] for k in range(full)]
        carry = pool[full * B:]
    return batches, carry


def epoch_plan(items: np.ndarray, bucket: np.ndarray, n_buckets: int, B: int, rng) -> list[np.ndarray]:
    """One epoch's training batches of B items: group_by_bucket (the last < B items left out), the batches in the
    order of rng's permutation; fewer than B items in all: one batch of them repeated to B."""
    if len(items) < B:
        return [np.resize(items, B)]
    batches = group_by_bucket(items, bucket, n_buckets, B)[0]
    return [batches[k] for k in rng.permutation(len(batches))]


def eval_plan_of(items: np.ndarray, bucket: np.ndarray, n_buckets: int, B: int) -> list[np.ndarray]:
    """Every item once in batches of B (group_by_bucket), the leftovers in a last batch padded with -1."""
    plan, carry = group_by_bucket(items, bucket, n_buckets, B)
    if len(carry):
        plan.append(np.concatenate([carry, np.full(B - len(carry), -1, np.int64)]))
    return plan


class BatchSource:
    """Fixed-shape batches from Encoded rows, grouped by length bucket. See the module doc."""

    def __init__(self, encoded: Encoded, batch_size: int, buckets: tuple[int, ...], seed: int,
                 select_ratio: float | None = None):
        buckets = tuple(int(b) for b in buckets)
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets = {buckets}; expected strictly increasing positive lengths")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}; expected >= 1")
        self.enc, self.batch_size, self.buckets, self.seed = encoded, int(batch_size), buckets, int(seed)
        self.pad_id = int(encoded.pad_id)
        self.lengths = np.asarray([len(x) - 1 for x in encoded.ids], np.int64)  # row length = inputs length
        if len(self.lengths) and self.lengths.max() > buckets[-1]:
            i = int(self.lengths.argmax())
            raise ValueError(f"example {i} has {self.lengths[i] + 1} tokens ({self.lengths[i]} input positions), "
                             f"longer than the largest bucket {buckets[-1]}; expected encode_examples with "
                             f"max_len <= {buckets[-1] + 1}")
        self.bucket_of = np.searchsorted(np.asarray(buckets), self.lengths, side="left")
        self.window = target_window(len(x) - p for x, p in zip(encoded.ids, encoded.prompt_len))
        task = np.asarray(encoded.task)
        self.select_rows = np.flatnonzero(task == SELECT)
        self.other_rows = np.flatnonzero(task != SELECT)
        self.select_ratio = select_ratio
        if select_ratio is None:
            self.n_select_epoch = len(self.select_rows)
            self.n_other_epoch = len(self.other_rows)
        else:
            r = float(select_ratio)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"select_ratio = {select_ratio}; expected None or a fraction in [0, 1]")
            if r > 0 and not len(self.select_rows):
                raise ValueError(f"select_ratio = {r} but there are no select examples; expected some or ratio 0")
            if r < 1 and not len(self.other_rows):
                raise ValueError(f"select_ratio = {r} but there are only select examples; expected others or 1")
            self.n_other_epoch = len(self.other_rows) if r < 1 else 0
            self.n_select_epoch = (len(self.select_rows) if r == 1
                                   else int(round(r * self.n_other_epoch / (1.0 - r))))
        self.epoch_size = self.n_select_epoch + self.n_other_epoch
        if self.epoch_size == 0:
            self.steps_per_epoch = 0
        else:  # a set smaller than one batch still gives one (cyclically filled) batch per epoch
            self.steps_per_epoch = max(1, self.epoch_size // self.batch_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    # -- training ----------------------------------------------------------------------------------------------
    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The epoch's example indices (select rows sub/over-sampled to select_ratio), permuted."""
        rng = np.random.default_rng([self.seed, epoch])
        rows = [self.other_rows[:self.n_other_epoch]]
        n_sel, sel = self.n_select_epoch, self.select_rows
        if n_sel:
            reps, rem = divmod(n_sel, len(sel))
            rows += [sel] * reps + [np.sort(rng.choice(sel, size=rem, replace=False))]
        rows = np.concatenate(rows).astype(np.int64)
        return rows[rng.permutation(len(rows))]

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The row indices of each batch of the epoch, in step order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rows = self.epoch_rows(epoch)
        rng = np.random.default_rng([self.seed, epoch, 1])
        batches = epoch_plan(rows, self.bucket_of[rows], len(self.buckets), self.batch_size, rng)
        assert len(batches) == self.steps_per_epoch, (len(batches), self.steps_per_epoch)
        self._cache = (epoch, batches)
        return batches

    @property
    def rows_per_batch(self) -> int:
        """Rows of one batch's arrays (the global batch)."""
        return self.batch_size

    def _out(self, rows_of) -> np.ndarray | None:
        return None if rows_of is None else np.asarray(rows_of(self.rows_per_batch), np.int64)

    def batch(self, step: int, rows_of=None) -> dict[str, np.ndarray]:
        """The batch of a training step: a pure function of (seed, step). rows_of(n_rows) -> the indices of the
        rows to build (this process's slice of the global batch); None = all rows."""
        if self.steps_per_epoch == 0:
            raise ValueError("BatchSource has no examples for a training batch; expected a non-empty training set")
        if step < 0:
            raise ValueError(f"step = {step}; expected >= 0")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        return self.make_batch(self.epoch_batches(epoch)[k], self._out(rows_of))

    # -- evaluation --------------------------------------------------------------------------------------------
    def eval_plan(self) -> list[np.ndarray]:
        """Row indices of each eval batch (-1 = a padding row), every example exactly once, fixed order."""
        return eval_plan_of(np.arange(len(self.lengths)), self.bucket_of, len(self.buckets), self.batch_size)

    def eval_batches(self, rows_of=None) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in a fixed order; the last batch is padded with weight-0 rows. rows_of: as batch."""
        out = self._out(rows_of)
        for rows in self.eval_plan():
            yield self.make_batch(rows, out)

    # -- rows -> arrays ----------------------------------------------------------------------------------------
    def bucket_length(self, rows: np.ndarray) -> int:
        """The smallest bucket that fits every row of a batch (all of its rows, wherever they are built)."""
        longest = max((int(self.lengths[i]) for i in rows if i >= 0), default=1)
        return self.buckets[int(np.searchsorted(np.asarray(self.buckets), longest, side="left"))]

    def make_batch(self, rows: np.ndarray, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """inputs/targets/weights/positions [B, L] and task [B] for these rows (-1 = an all-padding row); L = the
        smallest bucket that fits every row. out: build only these rows of the batch (B = len(out)); L is still
        the whole batch's."""
        L = self.bucket_length(rows)
        rows = rows if out is None else np.asarray(rows)[out]
        B = len(rows)
        inputs = np.full((B, L), self.pad_id, np.int32)
        targets = np.full((B, L), self.pad_id, np.int32)
        weights = np.zeros((B, L), np.float32)
        task = np.zeros((B,), np.int32)
        for r, i in enumerate(rows):
            if i < 0:
                continue
            ids = self.enc.ids[i]
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = ids[1:]
            weights[r, self.enc.prompt_len[i] - 1:n] = (1.0 if self.enc.target_weights is None
                                                         else self.enc.target_weights[i])
            task[r] = self.enc.task[i]
        positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
        starts = np.asarray([self.enc.prompt_len[i] - 1 if i >= 0 else 0 for i in rows], np.int64)
        return add_window({"inputs": inputs, "targets": targets, "weights": weights, "positions": positions,
                           "task": task}, starts, self.window)


# -- sequence packing (data.packing) ------------------------------------------------------------------------------
PACK_WINDOW = 1024  # examples per packing window: first-fit places each one into the rows opened in its window
PACK_TARGET_SLACK = 2.0  # a packed row's target-token cap: this x the source's target share of its capacity


def pack(order: np.ndarray, lengths: np.ndarray, targets: np.ndarray, capacity: int, target_cap: int,
         window: int = PACK_WINDOW) -> list[np.ndarray]:
    """Greedy first-fit of the examples `order` into rows of `capacity` input positions: the examples are taken in
    the given order, `window` at a time; each goes into the first row opened in its window that still has room
    for its lengths[i] positions and its targets[i] target tokens (at most target_cap per row), else into a new
    row. The rows of a window close when the next window starts. -> the example indices of each row, in
    placement order (the order of the segments in the row); rows in the order they were opened. A pure function
    of its arguments (deterministic)."""
    out: list[np.ndarray] = []
    order = np.asarray(order, np.int64)
    for s in range(0, len(order), window):
        chunk = order[s:s + window]
        free = np.zeros(len(chunk), np.int64)  # room left in each row opened in this window
        tfree = np.zeros(len(chunk), np.int64)
        rows: list[list[int]] = []
        for i in chunk.tolist():
            n, t = int(lengths[i]), int(targets[i])
            if n > capacity or t > target_cap:
                raise ValueError(f"example {i}: {n} positions and {t} target tokens; expected at most {capacity} "
                                 f"and {target_cap} (a packed row's capacity)")
            m = len(rows)
            ok = (free[:m] >= n) & (tfree[:m] >= t)
            r = int(ok.argmax()) if m else 0
            if not m or not ok[r]:
                r = m
                rows.append([])
                free[r], tfree[r] = capacity, target_cap
            rows[r].append(i)
            free[r] -= n
            tfree[r] -= t
        out += [np.asarray(r, np.int64) for r in rows]
    return out


class PackedBatchSource(BatchSource):
    """BatchSource with several examples per row (data.packing, Stage 1): each row holds whole examples one after
    the other (segments 1, 2, ... in `segment_ids`, 0 = padding), each with positions restarting at 0; the model
    masks attention to the token's own segment (model.Transformer.hidden_states(segment_ids=...)), so a segment's
    logits are those of its example run alone, and the loss sums (sft_loss_sums) are those of the same examples
    unpacked: the per-token mean over the step's target tokens is unchanged.

    - Training: the epoch's examples (epoch_rows: the same seeded permutation and select_ratio sampling as
      unpacked) are packed in that order by `pack` (first-fit within windows of PACK_WINDOW examples) into rows
      of buckets[-1] positions; the rows are grouped into batches by length bucket (a row's bucket: the smallest
      that fits its segments; the leftovers of a bucket move up, the last < B rows are left out, as unpacked) and
      the batches permuted with the epoch's seed. The number of batches varies a little from epoch to epoch, so
      batch(step) counts the batches of the epochs before (each packed once, cached): a pure function of
      (seed, step), as unpacked; a resumed run packs the earlier epochs again to find its place.
    - Evaluation: every example once, packed in file order, the last batch padded with empty rows; the held-out
      loss equals the unpacked one (the same tokens summed in another order).
    - Loss window: a packed row's target tokens (all its segments') are gathered left-aligned into win_idx [B, W]
      with W = target_cap: at least the unpacked window (every example fits a row alone), else PACK_TARGET_SLACK x
      the source's share of target tokens in a full row, rounded up to 16; `pack` closes a row at that many
      target tokens. win_task [B, W] is the task of each window position (a row mixes tasks)."""

    def __init__(self, encoded: Encoded, batch_size: int, buckets: tuple[int, ...], seed: int,
                 select_ratio: float | None = None, window: int = PACK_WINDOW):
        super().__init__(encoded, batch_size, buckets, seed, select_ratio)
        if window < 1:
            raise ValueError(f"packing window = {window}; expected >= 1 example")
        self.pack_window = int(window)
        self.capacity = self.buckets[-1]
        self.targets = np.asarray([len(x) - p for x, p in zip(encoded.ids, encoded.prompt_len)], np.int64)
        share = float(self.targets.sum()) / max(float(self.lengths.sum()), 1.0)
        cap = -(-math.ceil(self.capacity * share * PACK_TARGET_SLACK) // WINDOW_MULTIPLE) * WINDOW_MULTIPLE
        self.unpacked_window = self.window
        self.window = self.target_cap = max(self.window, min(self.capacity, cap))
        self._counts: dict[int, int] = {}  # epoch -> its number of batches
        self._packs: tuple[int, list[np.ndarray], list[np.ndarray]] | None = None  # (epoch, rows, batches)
        self._eval: list[list[np.ndarray]] | None = None
        if self.epoch_size:
            self.steps_per_epoch = len(self.epoch_batches(0))  # epoch 0's (others differ a little)

    # -- training ----------------------------------------------------------------------------------------------
    def packed_rows(self, order: np.ndarray) -> list[np.ndarray]:
        return pack(order, self.lengths, self.targets, self.capacity, self.target_cap, self.pack_window)

    def _row_buckets(self, packed: list[np.ndarray]) -> np.ndarray:
        total = np.asarray([int(self.lengths[p].sum()) for p in packed], np.int64)
        return np.searchsorted(np.asarray(self.buckets), total, side="left")

    def epoch_packed(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(the epoch's packed rows, the packed-row indices of each batch in step order)."""
        if self._packs is not None and self._packs[0] == epoch:
            return self._packs[1], self._packs[2]
        packed = self.packed_rows(self.epoch_rows(epoch))
        rng = np.random.default_rng([self.seed, epoch, 1])
        batches = epoch_plan(np.arange(len(packed)), self._row_buckets(packed), len(self.buckets), self.batch_size,
                             rng)
        self._packs = (epoch, packed, batches)
        self._counts[epoch] = len(batches)
        return packed, batches

    def epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
        """The batches of the epoch in step order, each a list of B packed rows (example indices)."""
        packed, batches = self.epoch_packed(epoch)
        return [[packed[k] for k in b] for b in batches]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a training step."""
        epoch, k = 0, int(step)
        while True:
            if epoch not in self._counts:
                self.epoch_packed(epoch)
            if k < self._counts[epoch]:
                return epoch, k
            k -= self._counts[epoch]
            epoch += 1

    def batch(self, step: int, rows_of=None) -> dict[str, np.ndarray]:
        if self.epoch_size == 0:
            raise ValueError("BatchSource has no examples for a training batch; expected a non-empty training set")
        if step < 0:
            raise ValueError(f"step = {step}; expected >= 0")
        epoch, k = self.locate(step)
        packed, batches = self.epoch_packed(epoch)
        return self.make_batch([packed[j] for j in batches[k]], self._out(rows_of))

    # -- evaluation --------------------------------------------------------------------------------------------
    def eval_plan(self) -> list[list[np.ndarray]]:
        """Every example once, packed in file order; each batch B packed rows (an empty row = padding)."""
        if self._eval is not None:  # packed once: every evaluation reads the same plan
            return self._eval
        packed = self.packed_rows(np.arange(len(self.lengths)))
        if not packed:
            return []
        plan = eval_plan_of(np.arange(len(packed)), self._row_buckets(packed), len(self.buckets), self.batch_size)
        empty = np.zeros(0, np.int64)
        self._eval = [[packed[k] if k >= 0 else empty for k in b] for b in plan]
        return self._eval

    # -- rows -> arrays ----------------------------------------------------------------------------------------
    def bucket_length(self, rows) -> int:
        longest = max((int(self.lengths[p].sum()) for p in rows), default=1)
        return self.buckets[int(np.searchsorted(np.asarray(self.buckets), max(longest, 1), side="left"))]

    def make_batch(self, rows, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """inputs/targets/weights/positions/segment_ids [B, L] and the loss window win_idx/win_targets/win_weights/
        win_task [B, W] for these packed rows (lists of example indices; empty = an all-padding row). L = the
        smallest bucket that fits every row; out: build only these rows (B = len(out)), L still the whole batch's."""
        L = self.bucket_length(rows)
        rows = list(rows) if out is None else [rows[int(o)] for o in out]
        B, W = len(rows), min(self.window, L)
        inputs = np.full((B, L), self.pad_id, np.int32)
        targets = np.full((B, L), self.pad_id, np.int32)
        weights = np.zeros((B, L), np.float32)
        positions = np.zeros((B, L), np.int32)
        segment_ids = np.zeros((B, L), np.int32)
        win_idx = np.zeros((B, W), np.int32)
        win_weights = np.zeros((B, W), np.float32)
        win_task = np.zeros((B, W), np.int32)
        for r, packed in enumerate(rows):
            off = w = 0
            for seg, i in enumerate(np.asarray(packed).tolist(), start=1):
                ids, p = self.enc.ids[i], self.enc.prompt_len[i]
                n, t = len(ids) - 1, len(ids) - p  # positions; target positions [p - 1, n - 1]
                inputs[r, off:off + n] = ids[:-1]
                targets[r, off:off + n] = ids[1:]
                tw = 1.0 if self.enc.target_weights is None else self.enc.target_weights[i]
                weights[r, off + p - 1:off + n] = tw
                positions[r, off:off + n] = np.arange(n)
                segment_ids[r, off:off + n] = seg
                win_idx[r, w:w + t] = np.arange(off + p - 1, off + n)
                win_weights[r, w:w + t] = tw
                win_task[r, w:w + t] = self.enc.task[i]
                off, w = off + n, w + t
        assert np.isclose(win_weights.sum(), weights.sum()), "a target token fell outside the loss window"
        return {"inputs": inputs, "targets": targets, "weights": weights, "positions": positions,
                "segment_ids": segment_ids, "win_idx": win_idx,
                "win_targets": np.take_along_axis(targets, win_idx, axis=1), "win_weights": win_weights,
                "win_task": win_task}


def batch_source(encoded: Encoded, batch_size: int, buckets, seed: int, select_ratio: float | None = None,
                 packing: bool = False) -> BatchSource:
    """The Stage 1 batch source: PackedBatchSource with packing (data.packing), else BatchSource."""
    cls = PackedBatchSource if packing else BatchSource
    return cls(encoded, batch_size, buckets, seed, select_ratio=select_ratio)
