"""Stage 2, Persona Alignment: DPO against a frozen reference model, plus an embedding-alignment term.

Each `generate` pair: prompt = the generate prompt with the labelled persona highlighted; chosen = the gold reply;
rejected = the Stage 1 model's reply to the persona-free prompt. Each `select` pair: prompt = the select prompt;
chosen = the labelled persona target; rejected = the target the Stage 1 model selected (pairs.py). Chosen and
rejected run through one forward as a [2B, L] batch (chosen rows first). The reference params are passed to the
jitted step as a separate argument that is never donated, never differentiated (stop_gradient) and, while it stays
fixed (no TR-DPO update, below), never checkpointed; or, with stage2.precompute_ref, their log-probs are computed
once and carried in the batches. Those log-probs are cached on disk, beside the pairs file, under a fingerprint of
the pairs (the file and the token ids of the rows), the reference params and the tokenization settings
(pal_jax/training/ref_cache.py), so a rerun or another Stage 2 on the same pairs and reference reads them instead of running
the reference again.

TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"), stage2.ref_sync_every = tau
> 0: after every tau-th step the reference moves toward the policy, ref <- alpha * policy + (1 - alpha) * ref with
alpha = stage2.ref_sync_alpha (1 = the hard update: the reference becomes the policy). The update is a jitted
function on device beside the train step (train.ReferenceSync; the old reference's buffers are donated), and the moving
reference is saved with every checkpoint (the item `extra`), so a resumed run continues with the same reference.
Not with stage2.precompute_ref (fixed log-probs cannot follow a moving reference; config validation refuses it).
With LoRA the reference is the policy's frozen base + reference adapters, and the update moves the adapters: the
hard update (alpha = 1) is exact (the reference becomes the policy); a soft one is refused, since mixing the A and B
factors of the adapters is not mixing the models (B A is not linear in them).

The reference, stage2.reference:
- "stage1" (default; the paper): the Stage 1 model, i.e. the policy's own starting point, so the first step's DPO
  loss is log 2.
- "base" (PAL's released LoRA code, whose reference is the bare base model): the weights Stage 1 started from.
  Stage 1's saved config says which: its init_from (pretrained weights, a GGUF, another pal_jax workdir: its latest
  checkpoint), loaded again; or, for a random init, the same init rebuilt from Stage 1's seed and model config (an
  error names stage2.reference when it cannot be rebuilt exactly). A LoRA Stage 1 started from its frozen base (a
  LoRA Stage 1 that continued earlier adapters of the same shape is followed back to their base: the base model
  alone).
In both cases the policy starts from Stage 1 and the pairs come from the Stage 1 model; only the reference differs.

Loss = DPO (or the variant or weighted sum of variants named by stage2.loss_type: losses.dpo_per_pair; with
"sigmoid_norm" each side's log-probs are divided by its number of target tokens, counted from the batch's weights,
so the precomputed reference log-probs are normalised the same way) over all pairs (if stage2.use_dpo) +
stage2.sft_weight * the chosen target's mean token NLL (an NLL term on the chosen side, as in RPO, Pang et al. 2024:
plain DPO can lower the chosen log-prob while it widens the margin, which shows up as a higher perplexity and a
lower F1) + stage2.align_weight * InfoNCE(pooled persona-block hidden states, pooled chosen response hidden states)
over the chosen rows of the `generate` pairs.

With LoRA (config.lora.rank > 0; pal_jax/model/lora.py) the policy is the frozen base + trainable adapters that start
from Stage 1's. The "stage1" reference is the same base arrays + Stage 1's adapters, frozen; the "base" reference
is the same base arrays + all-zero adapters (exactly the base model). Either way one copy of the base is held and
only the adapter trees are duplicated (after a full fine-tune Stage 1, "base" needs Stage 1's initial weights as a
second full tree).

The Stage 2 run takes train.{steps,lr,batch_size,warmup_steps} from stage2.{steps,lr,batch_size,warmup_steps};
the other train.* settings (clipping, cadences, checkpoints) are shared with Stage 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.data import convai2, labels, pipeline, preferences
from pal_jax.inference.predictor import Predictor, calibrate, calibration_data, sampling_config
from pal_jax.model import logprobs, lora
from pal_jax.model.spec import ModelSpec, model_config
from pal_jax.model.transformer import shard_activations
from pal_jax.training import loop as train
from pal_jax.training import losses, ref_cache, samples
from pal_jax.training.experiment import Experiment
from pal_jax.training.make_pairs import info_path, make_pairs, pairs_path, read_pairs
from pal_jax.weights import init_from, tokenizers


@dataclasses.dataclass
class PairEncoded:
    prompt: list[list[int]]
    chosen: list[list[int]]  # response ids + the end token (eos; <|im_end|> for ChatML-rendered pairs)
    rejected: list[list[int]]
    head_len: list[int]  # tokens of the persona block at the start of the prompt (0 if it was cut)
    is_select: list[bool]
    n_truncated: int
    n_dropped: int  # pairs dropped: a reply empty, or too long for max_len with a minimal prompt (never trained on)
    n_empty: int = 0  # of n_dropped: an empty (or blank) chosen or rejected reply


def encode_pairs(rows: list[dict], tokenizer, max_len: int) -> PairEncoded:
    """Tokenised pairs (rows from pairs.read_pairs; prompts from preferences.prompt_parts). A reply is never cut: a
    pair whose chosen or rejected reply is empty, or leaves fewer than pipeline.MIN_PROMPT prompt tokens within
    max_len, is dropped and counted in n_dropped (as Stage 1 drops its examples whose target does not fit)."""
    out = PairEncoded([], [], [], [], [], 0, 0)
    for r in rows:
        is_select = r.get("kind", "generate") == "select"
        if not r["chosen"].strip() or not r["rejected"].strip():
            out.n_dropped += 1
            out.n_empty += 1
            continue
        parts = preferences.prompt_parts(r)
        end = preferences.reply_end(r, tokenizer)
        c = tokenizer.encode(r["chosen"]) + end
        j = tokenizer.encode(r["rejected"]) + end
        budget = max_len - max(len(c), len(j))
        if budget < pipeline.MIN_PROMPT:
            out.n_dropped += 1
            continue
        head = tokenizer.encode(parts.head)
        prompt, cut = pipeline.fit_prompt(head, [tokenizer.encode(h) for h in parts.history],
                                          tokenizer.encode(parts.tail), budget)
        out.n_truncated += bool(cut)
        out.prompt.append(prompt)
        out.chosen.append(c)
        out.rejected.append(j)
        out.head_len.append(len(head) if prompt[:len(head)] == head else 0)
        out.is_select.append(is_select)
    return out


class PairSource(pipeline.BatchSource):
    """Bucketed pair batches (pure function of (seed, step), as BatchSource).

    Two layouts, the same pairs in the same batches (the plan is made on the unshared lengths either way):
    - share_prompt False: [2B, L] rows [chosen..., rejected...], each row the prompt + one reply.
    - share_prompt True (stage2.share_prompt): [B, L'] rows, one per pair: the prompt's first P-1 tokens (segment
      0, seen by both branches: shared_keys), then the chosen branch (segment 1: the prompt's last token and the
      chosen reply), then the rejected branch (segment 2: the prompt's last token again, at the same position, and
      the rejected reply), each branch's positions continuing the prompt's. Every token sees what it would see in
      its own unshared row, so the log-probs are the same up to float rounding, while the prompt runs through the
      model once per pair instead of twice. A pair whose two replies are the same tokens (identical_pairs=keep)
      has no rejected branch: its rejected log-prob is its chosen one (rej_same), as the unshared rows compute.
      L' is the smallest of share_lengths(share_buckets or buckets) that holds the batch's longest row: the row
      lengths do not change which pairs go together (the plan), so share_buckets trades padding against compiled
      shapes without changing the training.

    flat_groups > 0 (stage2.flat_window, shared layout only): the loss window of each group of B / flat_groups
    consecutive rows (one data shard's rows) is one list of the group's reply positions (pipeline.add_flat_window)
    instead of W positions per row, so the LM head skips the rows' padding; its width is the batch's fullest group
    (pipeline.flat_width), so a batch compiles once per (L', width). flat_width_fixed: that width for every batch
    (the AOT compile's worst case)."""

    def __init__(self, enc: PairEncoded, batch_size: int, buckets, seed: int, share_prompt: bool = False,
                 share_buckets=(), flat_groups: int = 0):
        self.pairs = enc
        longest = [np.asarray(p + (c if len(c) >= len(j) else j), np.int32)
                   for p, c, j in zip(enc.prompt, enc.chosen, enc.rejected)]
        planning = pipeline.Encoded(ids=longest, prompt_len=[len(p) for p in enc.prompt],
                                    task=np.full(len(longest), pipeline.TASKS.index("generate"), np.int32),
                                    n_truncated=enc.n_truncated, n_dropped=enc.n_dropped, pad_id=0,
                                    index=np.arange(len(longest)))
        super().__init__(planning, batch_size, buckets, seed)  # window: the longest chosen or rejected response
        self.ref_logps: np.ndarray | None = None  # [N, 2] (chosen, rejected) when precomputed
        self.share_prompt = bool(share_prompt)
        if self.share_prompt:
            self.same = np.asarray([c == j for c, j in zip(enc.chosen, enc.rejected)], bool)
            self.shared_len = np.asarray([len(p) + len(c) - 1 + (0 if s else len(j)) for p, c, j, s in
                                          zip(enc.prompt, enc.chosen, enc.rejected, self.same)], np.int64)
            self.share_buckets = share_lengths(tuple(share_buckets) or self.buckets,
                                               int(self.shared_len.max(initial=1)))
            # the window runs from the prompt's last token over both branches
            self.win_need = np.asarray([len(c) + (0 if s else len(j)) for c, j, s in
                                        zip(enc.chosen, enc.rejected, self.same)], np.int64)
            self.window = pipeline.target_window(self.win_need)
        self.flat_groups, self.flat_width_fixed = int(flat_groups), None
        if self.flat_groups and (not self.share_prompt or batch_size % self.flat_groups):
            raise ValueError(f"flat_groups = {flat_groups} with share_prompt {share_prompt} and batch_size "
                             f"{batch_size}: expected share_prompt and a group count that divides the batch")

    def set_pad(self, pad_id: int):
        self.pad_id = pad_id

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size if self.share_prompt else 2 * self.batch_size

    def make_batch(self, rows: np.ndarray, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The pair batch of these B pairs (-1 = a padding pair). Unshared: [2B, L], row r < B is pair r's chosen
        side, row B + r its rejected side. Shared: [B, L'], row r is pair r (class doc). out: build only these of
        the rows (multi-host: this process's slice)."""
        if self.share_prompt:
            return self._make_shared_batch(rows, out)
        L = self.bucket_length(rows)
        B = len(rows)
        out = np.arange(2 * B) if out is None else np.asarray(out, np.int64)
        R = len(out)
        inputs = np.full((R, L), self.pad_id, np.int32)
        targets = np.full((R, L), self.pad_id, np.int32)
        weights = np.zeros((R, L), np.float32)
        persona = np.zeros((R, L), np.float32)
        valid = np.zeros((R,), np.float32)
        align = np.zeros((R,), np.float32)  # rows the embedding-alignment term uses: generate pairs
        ref = np.zeros((R,), np.float32)
        starts = np.zeros((R,), np.int64)
        e = self.pairs
        for row, o in enumerate(out):
            half, r = divmod(int(o), B)
            i = int(rows[r])
            if i < 0:
                continue
            ids = e.prompt[i] + (e.chosen[i] if half == 0 else e.rejected[i])
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            targets[row, :n] = ids[1:]
            weights[row, len(e.prompt[i]) - 1:n] = 1.0
            persona[row, :e.head_len[i]] = 1.0
            valid[row] = 1.0
            align[row] = 0.0 if e.is_select[i] else 1.0
            starts[row] = len(e.prompt[i]) - 1
            if self.ref_logps is not None:
                ref[row] = self.ref_logps[i, half]
        positions = np.broadcast_to(np.arange(L, dtype=np.int32), (R, L)).copy()
        batch = {"inputs": inputs, "targets": targets, "weights": weights, "positions": positions,
                 "persona_mask": persona, "valid": valid, "align_mask": align, "task": np.zeros((R,), np.int32)}
        pipeline.add_window(batch, starts, self.window)
        if self.ref_logps is not None:
            batch["ref_logps"] = ref
        return batch

    def shared_length(self, rows: np.ndarray) -> int:
        """L' of these pairs' shared batch (class doc)."""
        real = np.asarray(rows)[np.asarray(rows) >= 0]
        longest = int(self.shared_len[real].max()) if len(real) else 1
        return int(self.share_buckets[np.searchsorted(self.share_buckets, longest)])

    def _make_shared_batch(self, rows: np.ndarray, out: np.ndarray | None) -> dict[str, np.ndarray]:
        L = self.shared_length(rows)
        B = len(rows)
        out = np.arange(B) if out is None else np.asarray(out, np.int64)
        R = len(out)
        inputs = np.full((R, L), self.pad_id, np.int32)
        targets = np.full((R, L), self.pad_id, np.int32)
        weights = np.zeros((R, L), np.float32)  # the chosen reply's tokens
        rej_weights = np.zeros((R, L), np.float32)  # the rejected reply's tokens
        segments = np.full((R, L), 3, np.int32)  # padding: a segment of its own, after every real token
        shared = np.zeros((R, L), bool)
        positions = np.zeros((R, L), np.int32)
        persona = np.zeros((R, L), np.float32)
        valid = np.zeros((R,), np.float32)
        align = np.zeros((R,), np.float32)
        same = np.zeros((R,), np.float32)
        ref = np.zeros((R, 2), np.float32)
        starts = np.zeros((R,), np.int64)
        e = self.pairs
        for row, o in enumerate(out):
            i = int(rows[int(o)])
            if i < 0:
                continue
            p, c, j = e.prompt[i], e.chosen[i], e.rejected[i]
            P = len(p)
            inputs[row, :P - 1] = p[:-1]
            targets[row, :P - 1] = p[1:]
            positions[row, :P - 1] = np.arange(P - 1)
            segments[row, :P - 1] = 0
            shared[row, :P - 1] = True
            at = P - 1
            branches = ((1, c, weights),) if self.same[i] else ((1, c, weights), (2, j, rej_weights))
            for seg, reply, w in branches:
                n = len(reply)
                inputs[row, at:at + n] = [p[-1]] + reply[:-1]
                targets[row, at:at + n] = reply
                positions[row, at:at + n] = np.arange(P - 1, P - 1 + n)
                segments[row, at:at + n] = seg
                w[row, at:at + n] = 1.0
                at += n
            persona[row, :e.head_len[i]] = 1.0
            valid[row] = 1.0
            align[row] = 0.0 if e.is_select[i] else 1.0
            same[row] = float(self.same[i])
            starts[row] = P - 1
            if self.ref_logps is not None:
                ref[row] = self.ref_logps[i]
        batch = {"inputs": inputs, "targets": targets, "weights": weights, "rej_weights": rej_weights,
                 "positions": positions, "segment_ids": segments, "shared_keys": shared, "persona_mask": persona,
                 "valid": valid, "align_mask": align, "rej_same": same, "task": np.zeros((R,), np.int32)}
        if self.flat_groups:
            self._add_flat_window(batch, rows, out)
        else:
            pipeline.add_window(batch, starts, self.window)
            w = np.take_along_axis(rej_weights, batch["win_idx"].astype(np.int64), axis=1)
            w *= (starts[:, None] + np.arange(batch["win_idx"].shape[1])[None, :]) < L  # clipped positions: 0
            assert np.isclose(w.sum(), rej_weights.sum()), "a rejected token fell outside the loss window"
            batch["win_rej_weights"] = w.astype(np.float32)
        if self.ref_logps is not None:
            batch["ref_logps"] = ref
        return batch

    def flat_width(self, rows: np.ndarray) -> int:
        """The flat window's width for these B pairs (all of the batch's rows, wherever they are built)."""
        if self.flat_width_fixed:
            return int(self.flat_width_fixed)
        rows = np.asarray(rows, np.int64)
        need = np.where(rows >= 0, self.win_need[np.maximum(rows, 0)] if len(self.win_need) else 0, 0)
        return pipeline.flat_width(need, len(rows) // self.flat_groups, self.window)

    def _add_flat_window(self, batch, rows, out: np.ndarray):
        """out: the batch rows built here (_make_shared_batch's, all of them by default)."""
        group = len(rows) // self.flat_groups
        blocks = out.reshape(-1, group) if len(out) % group == 0 else None
        if blocks is None or np.any(blocks != blocks[:, :1] + np.arange(group)) or np.any(blocks[:, 0] % group):
            raise ValueError(f"rows {out.tolist()} of a batch of {len(rows)}: expected whole groups of {group} "
                             f"consecutive rows (a process builds the rows of its data shards)")
        pipeline.add_flat_window(batch, group, self.flat_width(rows),
                                 {"weights": "win_weights", "rej_weights": "win_rej_weights"}, rows=out)


def share_lengths(buckets, longest: int) -> np.ndarray:
    """The row lengths of shared-prompt batches: the configured buckets, then steps of an eighth of the largest
    (rounded up to a multiple of 16) until one holds `longest`. A shared row is the prompt + both replies, so it can
    exceed the largest bucket (at most data.max_len + the longest reply). Only the lengths batches reach compile."""
    out = [int(b) for b in buckets]
    step = -(-max(16, out[-1] // 8) // 16) * 16
    while out[-1] < longest:
        out.append(out[-1] + step)
    return np.asarray(out, np.int64)


def shared_layout(batch) -> bool:
    """Which PairSource layout a batch has: True for share_prompt's [B, L'] rows (one per pair), False for the
    two-row [2B, L] layout (chosen rows, then rejected rows). Told by its keys, so it is static under jit: only
    the shared layout carries the rejected branch's weights."""
    return "rej_weights" in batch


def halves(x):
    """(chosen rows' part, rejected rows' part) of a per-row array of the two-row layout."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _forward(model, batch):
    """(hidden states of the chosen rows, chosen log-probs [B], rejected log-probs [B]): each summed over its
    response tokens, the LM head on the target window only; either PairSource layout."""
    if not shared_layout(batch):
        hidden = model.hidden_states(batch["inputs"], positions=batch["positions"])
        logps = logprobs.sequence_logprobs(*logprobs.window_logits(model, hidden, batch))
        return (halves(hidden)[0], *halves(logps))
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                 shared_keys=batch["shared_keys"])
    if "win_group" in batch:  # a flat window (PairSource flat_groups)
        chosen, rejected = logprobs.flat_window_sums(model, hidden, batch, ("win_weights", "win_rej_weights"))
    else:
        logits, targets, weights = logprobs.window_logits(model, hidden, batch)
        tok = logprobs.token_logprobs(logits, targets)
        chosen, rejected = jnp.sum(tok * weights, axis=-1), jnp.sum(tok * batch["win_rej_weights"], axis=-1)
    return hidden, chosen, jnp.where(batch["rej_same"] > 0, chosen, rejected)


def _logps(model, batch):
    """Summed log-prob of each pair's (chosen, rejected) response tokens: [B, 2]."""
    _, chosen, rejected = _forward(model, batch)
    return jnp.stack([chosen, rejected], axis=-1)


def target_tokens(batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) target-token counts of each pair, [B] each (sigmoid_norm's lengths)."""
    if not shared_layout(batch):
        return halves(jnp.sum(batch["weights"], axis=-1))
    chosen = jnp.sum(batch["weights"], axis=-1)
    return chosen, jnp.where(batch["rej_same"] > 0, chosen, jnp.sum(batch["rej_weights"], axis=-1))


def pair_rows(batch, key: str):
    """A per-row array of the batch on the pairs: the chosen rows' part (unshared layout) or the whole."""
    return batch[key] if shared_layout(batch) else halves(batch[key])[0]


def make_loss_fn(graphdef, s2):
    """loss_fn(model, batch, ref_params) for train.Task: sums so micro-batches and devices add up exactly."""
    from flax import nnx

    def loss_fn(model, batch, ref_params):
        hidden, chosen, rejected = _forward(model, batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]  # shared layout: [B, 2] (chosen, rejected); two rows: [2B], one per row
            ref = (ref[:, 0], ref[:, 1]) if shared_layout(batch) else halves(ref)
        else:
            ref = _forward(nnx.merge(graphdef, ref_params), batch)[1:]
        ref_c, ref_r = jax.lax.stop_gradient(ref)
        valid = pair_rows(batch, "valid")  # 0 for the padding rows of an eval batch
        ntok_c, ntok_r = target_tokens(batch)
        dpo_sum, n_real, out = losses.dpo_loss_sums(
            chosen, rejected, ref_c, ref_r, s2.beta, s2.label_smoothing, valid=valid,
            loss_type=s2.get("loss_type", "sigmoid"), chosen_tokens=ntok_c, rejected_tokens=ntok_r,
            norm_use_reference=s2.get("norm_use_reference", True), gamma=s2.get("simpo_gamma", 0.0))
        out = {"dpo_loss": dpo_sum, **out}
        total = dpo_sum if s2.use_dpo else jnp.zeros((), jnp.float32)
        if s2.sft_weight > 0:
            sft_sum = jnp.sum(-chosen / jnp.maximum(ntok_c, 1.0) * valid)
            total = total + s2.sft_weight * sft_sum
            out["chosen_nll"] = sft_sum
        if s2.align_weight > 0:
            p_emb = losses.pooled_embeddings(hidden, pair_rows(batch, "persona_mask"))
            r_emb = losses.pooled_embeddings(hidden, pair_rows(batch, "weights"))
            use = (valid * pair_rows(batch, "align_mask")) > 0
            align, amets = losses.embedding_alignment_loss(p_emb, r_emb, s2.align_temperature, valid=use)
            total = total + s2.align_weight * align * n_real  # the loop divides by n_real
            out["align_loss"] = align * n_real
            out.update({k: v * n_real for k, v in amets.items()})
        return total, n_real, out

    return loss_fn


# Stage 2's own schedule: these stage2.* keys take the place of train.*'s in the Stage 2 loop; every other train.*
# setting (grad_accum, clip_norm, schedule, weight decay, logging, evaluation and checkpoint cadence) is shared with
# Stage 1.
OWN_TRAIN_KEYS = ("steps", "lr", "batch_size", "warmup_steps")


def train_settings(config) -> ml_collections.ConfigDict:
    """The settings the Stage 2 loop trains with: config.train extended by stage2.{steps, lr, batch_size,
    warmup_steps}. The config itself stays as given (config.json records it as the user wrote it)."""
    t = ml_collections.ConfigDict(config.train.to_dict())
    for k in OWN_TRAIN_KEYS:
        t[k] = config.stage2[k]
    return t


def _working_copy(config) -> ml_collections.ConfigDict:
    """A copy of config that Stage 2 fills in (init_from, the Stage 1 tokenizer path) without touching the caller's."""
    return ml_collections.ConfigDict(config.to_dict())


def stage1_workdir(config, workdir: str) -> str:
    path = config.init_from
    if not path or not ckpt_lib.Checkpointer.exists(path):
        raise FileNotFoundError(
            f"no Stage 1 checkpoint at config.init_from = {path!r}: expected the workdir of a Stage 1 run; produce "
            f"it with `python -m pal_jax.main --config=configs/stage1.py:{config.preset} --workdir=W1`, then pass "
            f"--config.init_from=W1")
    return path


def _is_dev(pair_id, fraction: float) -> bool:
    """Hold out whole dialogues (ids 'dialogue:turn') for the held-out DPO loss: a fixed hash of the dialogue."""
    dialogue = str(pair_id).split(":")[0]
    return (int(dialogue) * 2654435761 % 2**32) / 2**32 < fraction if dialogue.isdigit() else False


def precompute_reference(ms, ref_params, src: PairSource) -> np.ndarray:
    """Reference log-probs of every pair's chosen and rejected response, once: [N, 2]."""
    from flax import nnx

    @jax.jit
    def logps(params, batch):
        # splash runs per device in shard_map over the mesh that shard_activations names (the train and eval steps
        # trace under it); the other attentions keep their program as it was
        with (shard_activations(ms.mesh, mesh_lib.BATCH) if ms.cfg.attention == "splash" else contextlib.nullcontext()):
            return _logps(nnx.merge(ms.graphdef, params), batch)

    out = np.zeros((len(src.pairs.prompt), 2), np.float32)
    n_rows = src.rows_per_batch
    local = mesh_lib.process_rows(ms.mesh, n_rows)  # this process builds its rows; every process gets all log-probs
    for rows in src.eval_plan():
        batch = src.make_batch(rows, local)
        lp = mesh_lib.to_host(logps(ref_params, mesh_lib.global_batch(batch, ms.mesh, n_rows)))  # [B, 2]
        for r, i in enumerate(rows):
            if i >= 0:
                out[i] = lp[r]
    return out


def cached_reference(c, ms, ref_params, sources: dict[str, PairSource], pairs_file: str, tokenizer,
                     workdir: str) -> tuple[str | None, bool]:
    """Set each source's ref_logps from the on-disk cache (pal_jax/training/ref_cache.py), or compute them with the reference
    and cache them. Returns (the cache file or None, whether it was a hit). Multi-host: process 0 reads and writes
    the file; every process gets its arrays, and all of them compute on a miss."""
    key = ref_cache.cache_key(c, pairs_file, ref_params, tokenizer, {k: s.pairs for k, s in sources.items()})
    name = f"{ref_cache.fingerprint(key)}.npz"
    sizes = {k: len(s.pairs.prompt) for k, s in sources.items()}
    places = ref_cache.folders(pairs_file, workdir)
    found, path = None, None
    if mesh_lib.is_primary():
        for folder in places:
            found = ref_cache.load(folder / name, key, sizes)
            if found is not None:
                path = os.fspath(folder / name)
                break
    if jax.process_count() > 1:
        hit = bool(mesh_lib.broadcast(np.asarray(found is not None)))
        if hit:
            found = {k: np.asarray(mesh_lib.broadcast(found[k] if found else np.zeros((n, 2), np.float32)))
                     for k, n in sizes.items()}
    if found is not None:
        for k, s in sources.items():
            s.ref_logps = found[k]
        logging.info("reference log-probs: cache hit %s", path or name)
        return path, True
    for s in sources.values():
        s.ref_logps = precompute_reference(ms, ref_params, s)
    if mesh_lib.is_primary():
        path = ref_cache.save(places, name, key, {k: s.ref_logps for k, s in sources.items()})
    mesh_lib.sync("reference log-probs cached")
    logging.info("reference log-probs: computed and cached %s", path if path else "(not cached: see the warning)")
    return path, False


def soft_update(alpha: float):
    """update(ref, policy) -> alpha * policy + (1 - alpha) * ref, leaf by leaf in float32, in the reference's dtype
    (TR-DPO; alpha = 1: the policy itself, exactly)."""
    alpha = float(alpha)

    def update(ref, policy):
        if alpha == 1.0:
            return jax.tree.map(lambda r, p: p.astype(r.dtype), ref, policy)
        return jax.tree.map(lambda r, p: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32))
                            .astype(r.dtype), ref, policy)
    return update


def reference_sync(c, ms, ref_params, lora_state) -> "train.ReferenceSync | None":
    """The TR-DPO reference update (module doc) for stage2.ref_sync_every > 0, else None. Its state is the
    reference's trainable-shaped part: the whole tree, or with LoRA the reference adapters (the base must then be
    the policy's frozen base itself)."""
    every = int(c.stage2.get("ref_sync_every", 0))
    if every <= 0:
        return None
    alpha = float(c.stage2.get("ref_sync_alpha", 1.0))
    state = ref_params
    if lora_state is not None:
        state, ref_base = lora.split(ref_params)
        if not all(a is b for a, b in zip(jax.tree.leaves(ref_base), jax.tree.leaves(lora_state[0]))):
            raise ValueError(
                "config.stage2.ref_sync_every > 0 with LoRA (config.lora.rank > 0): the reference's base is not the "
                "policy's frozen base (stage2.reference='base' after a Stage 1 with other adapters or none), so "
                "the reference cannot move toward the policy by its adapters; expected stage2.reference='stage1', "
                "or stage2.ref_sync_every=0, or Stage 2 without LoRA")
    return train.ReferenceSync(state=state, every=every, update=soft_update(alpha), signature={"alpha": alpha})


def run(config, workdir: str, devices=None) -> dict:
    return train_stage2(config, workdir, devices)[0]


def stage1_predictor(c, exp, s1_params, s1: str):
    """The Stage 1 model's Select then Generate predictor (make_pairs decodes the rejected replies with it, and
    takes the select pairs' rejected side from its selection rule; the calibrated rule's bias is the one the
    evaluation of the Stage 1 workdir s1 uses, fitted once and saved there)."""
    p = Predictor(exp.model, s1_params, exp.tokenizer, max_len=c.data.max_len, buckets=tuple(c.data.buckets),
                  batch_size=c.predict.batch_size, sampling_cfg=sampling_config(c), select_by=c.predict.select_by,
                  seed=c.seed)
    meta = ckpt_lib.load_meta(s1)
    return calibrate(c, p, s1, meta["step"], calibration_data(c, meta.get("config")))


def run_make_pairs(config, workdir: str) -> dict:
    """make_pairs mode: pairs from the Stage 1 model at config.init_from (or this workdir) into WORKDIR."""
    c = _working_copy(config)
    if not c.init_from:
        c.init_from = workdir
    s1 = stage1_workdir(c, workdir)
    c.tokenizer.path = tokenizers.stage1_tokenizer_path(c.tokenizer.path, s1)
    exp = Experiment(c, workdir)
    s1_params, _ = stage1_params(exp, s1)
    return make_pairs(stage1_predictor(c, exp, s1_params, s1), exp.corpus["train"], workdir, c.seed,
                      **pair_settings(c))


def pair_settings(c) -> dict:
    """make_pairs' keyword arguments from config.stage2."""
    s2 = c.stage2
    return dict(max_turns=s2.max_pair_turns, select_pairs=s2.select_pairs, generate_on=s2.generate_pairs_on,
                rejected_from=s2.rejected, identical=s2.get("identical_pairs", "drop"),
                select_rejected=s2.get("select_rejected", "runner_up"), highlight=s2.get("pair_highlight", "label"))


def stage1_params(exp: Experiment, s1: str):
    """(the Stage 1 model at s1 as one params tree, (frozen base, initial policy adapters) or None).

    Without LoRA: Stage 1's params (a LoRA Stage 1's adapters merged into its base). With LoRA: lora.combine(base,
    Stage 1's adapters), whose base leaves are the frozen base's own arrays; the second item gives them with the
    adapters the policy starts from (the same values: copy them before training, the train step donates them)."""
    ms = exp.model
    if ms.lora is None:
        return init_from.checkpoint_params(s1, ms), None
    base, adapters = init_from.initial_state(s1, ms, exp.config.seed)
    return lora.combine(base, adapters), (base, adapters)


REFERENCES = ("stage1", "base")  # stage2.reference (module doc)
_BASE_ERROR = ("config.stage2.reference = 'base': the weights Stage 1 ({s1}) started from cannot be rebuilt: {why}; "
               "expected {fix}, or use --config.stage2.reference=stage1 (the Stage 1 model as the reference)")


def _saved_config(path: str) -> dict:
    return ckpt_lib.load_meta(path).get("config") or {}


def stage1_start(s1: str) -> tuple[str, dict]:
    """(init_from, saved config) of the run whose starting weights are the ones the Stage 1 run at s1 started from
    (without adapters): Stage 1's own init_from and config, except that a LoRA Stage 1 whose init_from is a LoRA
    checkpoint with the same adapters trained on that checkpoint's base, so the chain is followed back (as
    init_from.base_params does). init_from "" means a random init from that config's seed and model."""
    spec = s1
    for _ in range(16):
        saved = _saved_config(spec)
        if not saved:
            raise ValueError(_BASE_ERROR.format(s1=s1, why=f"the checkpoint of {spec} records no config",
                                                fix="a checkpoint written by a pal_jax run (meta holds its config)"))
        parent = saved.get("init_from", "")
        own = lora.lora_config(saved)
        continued = bool(parent) and ckpt_lib.Checkpointer.exists(parent) and init_from.checkpoint_lora(parent) == own
        if own is None or not continued:
            return parent, saved
        spec = parent
    raise ValueError(_BASE_ERROR.format(s1=s1, why="its chain of LoRA init_from checkpoints is longer than 16",
                                        fix="a chain that ends at pretrained weights or a random init"))


def _saved_model_config(exp: Experiment, s1: str, saved: dict):
    """The ModelConfig a run with saved config `saved` built (vocab_size 0: the tokenizer's, Stage 1's own), with
    this run's model.attention (a run-time choice: Stage 1 on splash and Stage 2 on xla build the same params)."""
    try:
        return model_config(saved["model"], exp.tokenizer.vocab_size, exp.model_cfg.attention)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(_BASE_ERROR.format(s1=s1, why=f"its saved model config does not build ({e})",
                                            fix="a Stage 1 checkpoint written by this version of pal_jax")) from e


def _random_init(exp: Experiment, s1: str, saved: dict):
    """The random init of the run with saved config `saved` (its seed and model config), for exp.model's plain
    params: what train.run built at step 0 (ms.init(seed); with LoRA the base init is the same, ModelSpec)."""
    plain = exp.model.plain()
    seed = int(saved.get("seed", 0))
    cfg = _saved_model_config(exp, s1, saved)
    if cfg == plain.cfg:
        return plain.init(seed)
    ms1 = ModelSpec(cfg, plain.mesh, plain.rules)
    shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)  # noqa: E731
    if jax.tree.structure(ms1.abstract) != jax.tree.structure(plain.abstract) or \
            shapes(ms1.abstract) != shapes(plain.abstract):
        raise ValueError(_BASE_ERROR.format(
            s1=s1, why=f"Stage 1's random init (seed {seed}) has other parameter shapes than this run's model "
                       f"(Stage 1 model config {cfg}, this run's {plain.cfg})",
            fix="this run's config.model (and tokenizer) equal to Stage 1's"))
    return jax.device_put(ms1.init(seed), plain.shardings)


def _zero_adapters(ms):
    """All-zero adapters for the LoRA model state ms: base + these = exactly the base model."""
    return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), ms.abstract),
                   out_shardings=ms.shardings)()


def base_params(exp: Experiment, s1: str, lora_state=None):
    """(params for exp.model, a description): the weights the Stage 1 run at s1 started from, the reference of
    stage2.reference='base' (module doc). With LoRA: the base + zero adapters; when Stage 1 trained adapters of the
    same shape, the base is the policy's frozen base (lora_state[0]) itself, so it is held once."""
    ms = exp.model
    spec, saved = stage1_start(s1)
    desc = f"init_from {spec!r}" if spec else f"a random init (seed {int(saved.get('seed', 0))}, rebuilt)"
    plain = ms.plain()
    same_base = lora_state is not None and lora.lora_config(_saved_config(s1)) == ms.lora
    if same_base and not spec:  # init_from.base_params rebuilt it with this run's model config: it must be Stage 1's
        same_base = _saved_model_config(exp, s1, saved) == plain.cfg
    if same_base:
        base = lora_state[0]
    elif spec:
        try:
            base = init_from.full_params(spec, plain)
        except FileNotFoundError as e:
            raise FileNotFoundError(_BASE_ERROR.format(
                s1=s1, why=f"its init_from {spec!r} is not found ({e})",
                fix="the same weights at that path (a relative path is read from the current directory)")) from e
    else:
        base = _random_init(exp, s1, saved)
    if not spec:
        logging.info("stage2: reference = the random init Stage 1 (%s) started from, rebuilt from the seed (%d) "
                     "and model config its checkpoint records", s1, int(saved.get("seed", 0)))
    if ms.lora is None:
        return base, f"the weights Stage 1 started from: {desc}"
    return lora.combine(base, _zero_adapters(ms)), f"the base model alone (no adapters): {desc}"


def reference_params(exp: Experiment, s1: str, which: str, s1_tree, lora_state):
    """(the DPO reference params for exp.model, a description) for stage2.reference = which."""
    if which == "stage1":
        return s1_tree, f"the Stage 1 model {s1}" + (" (its base + its adapters)" if lora_state else "")
    if which == "base":
        return base_params(exp, s1, lora_state)
    raise ValueError(f"config.stage2.reference = {which!r}: expected one of {REFERENCES}")


def pair_sources(c, tokenizer, path: str, s1: str, data_shards: int = 1) -> tuple[PairSource, PairSource]:
    """(training, held-out) pair batches of the pairs file at path (whole dialogues held out: _is_dev); s1: the
    Stage 1 workdir (its chat template renders conversational pairs); data_shards: the mesh's data * fsdp (one
    flat-window group each, with stage2.flat_window)."""
    rows = read_pairs(path, labeler=labels.get_labeler(c.data.labeler),  # labels the pairs given without one
                      chat_template=lambda: init_from.chat_template(s1))  # renders conversational pairs
    dev_rows = [r for r in rows if _is_dev(r.get("id"), c.stage2.dev_fraction)]
    train_rows = [r for r in rows if not _is_dev(r.get("id"), c.stage2.dev_fraction)]
    if not train_rows or not dev_rows:
        raise convai2.DataError(f"{path}: {len(train_rows)} training and {len(dev_rows)} held-out pairs; expected "
                                f"both non-empty (stage2.dev_fraction = {c.stage2.dev_fraction}; pairs are held out by "
                                f"dialogue: 'dialogue_id', else the persona)")
    buckets = tuple(c.data.buckets)
    sources = []
    for name, part in (("train", train_rows), ("dev", dev_rows)):
        enc = encode_pairs(part, tokenizer, c.data.max_len)
        logging.info("stage2 %s: %d pairs (%d select); %d cut from the oldest history", name, len(enc.prompt),
                     sum(enc.is_select), enc.n_truncated)
        if enc.n_dropped:
            logging.warning("stage2 %s: %d pairs dropped: empty chosen/rejected after truncation (%d empty, %d too "
                            "long for data.max_len=%d with a minimal prompt)", name, enc.n_dropped, enc.n_empty,
                            enc.n_dropped - enc.n_empty, c.data.max_len)
        if not enc.prompt:
            raise convai2.DataError(f"{path}: every one of the {len(part)} {name} pairs was dropped (empty chosen/"
                                    f"rejected after truncation); expected pairs with non-empty replies that fit "
                                    f"data.max_len={c.data.max_len}")
        src = PairSource(enc, c.stage2.batch_size, buckets, c.seed, share_prompt=c.stage2.get("share_prompt", False),
                         share_buckets=tuple(c.stage2.get("share_buckets", ())),
                         flat_groups=data_shards if c.stage2.get("flat_window", False) else 0)
        src.set_pad(tokenizer.pad_id)
        sources.append(src)
    return sources[0], sources[1]


def train_stage2(config, workdir: str, devices=None):
    """Stage 2 training; returns (summary, the reference params object, for checks that it stayed intact; with
    LoRA one tree of the base and the reference's adapters; with stage2.ref_sync_every, the reference at the end)."""
    s1 = stage1_workdir(config, workdir)
    c = _working_copy(config)
    c.tokenizer.path = tokenizers.stage1_tokenizer_path(c.tokenizer.path, s1)
    exp = Experiment(c, workdir, devices=devices)
    ms = exp.model
    which = c.stage2.get("reference", "stage1")
    s1_tree, lora_state = stage1_params(exp, s1)
    ref_params, ref_desc = reference_params(exp, s1, which, s1_tree, lora_state)
    logging.info("stage2: initial policy = Stage 1 %s%s; DPO reference (stage2.reference=%s) = %s", s1,
                 " (LoRA)" if lora_state else "", which, ref_desc)
    path = c.stage2.pairs or pairs_path(workdir)
    if c.stage2.pairs:
        if not epath.Path(path).exists():
            raise convai2.DataFileNotFoundError(
                f"config.stage2.pairs = {path!r} does not exist; expected a preference JSONL file (a pairs.jsonl "
                f"written by make_pairs, or your pairs: docs/guide.md, 'Bring your own data'), or leave it empty to "
                f"make the pairs in the workdir")
    elif epath.Path(path).exists() and not epath.Path(info_path(workdir)).exists():
        logging.info("stage2: %s was not written by make_pairs (no pairs_info.json beside it): trained on as given",
                     path)
    else:  # the workdir's own pairs: made, or rebuilt when stage2's pair settings changed
        make_pairs(stage1_predictor(c, exp, s1_tree, s1), exp.corpus["train"], workdir, c.seed,  # always Stage 1's
                   **pair_settings(c))
    src, dev = pair_sources(c, exp.tokenizer, path, s1, mesh_lib.batch_divisor(ms.mesh))
    if src.flat_groups:
        logging.info("stage2: flat loss window (stage2.flat_window): each of %d data shards' %d rows list their reply "
                     "positions for the LM head (row window: %d positions a row)", src.flat_groups,
                     c.stage2.batch_size // src.flat_groups, src.window)
    reference, cache = ref_params, None
    if c.stage2.precompute_ref:
        cache, hit = cached_reference(c, ms, ref_params, {"train": src, "dev": dev}, path, exp.tokenizer, workdir)
        reference = None
        logging.info("stage2: reference log-probs %s for %d + %d pairs", "read" if hit else "precomputed",
                     len(src.pairs.prompt), len(dev.pairs.prompt))
    sync = reference_sync(c, ms, ref_params, lora_state)
    task = train.Task(name="stage2", loss_fn=make_loss_fn(ms.graphdef, c.stage2), train_batch=src.batch,
                      eval_batches=dev.eval_batches, reference=reference, ref_forwards=0 if reference is None else 1,
                      reference_sync=sync,
                      data_info={"seed": c.seed, "pairs": path, "train_pairs": len(src.pairs.prompt),
                                 "dev_pairs": len(dev.pairs.prompt), "steps_per_epoch": src.steps_per_epoch,
                                 "reference": which, "reference_weights": ref_desc},
                      sample=samples.make_sampler(c, ms, exp.tokenizer, exp.corpus["dev"]))
    if sync is not None:
        logging.info("stage2: TR-DPO reference update every %d steps, ref <- %g * policy + %g * ref%s", sync.every,
                     sync.signature["alpha"], 1 - sync.signature["alpha"], " (the LoRA adapters)" if lora_state else "")
        del ref_params  # its buffers are donated to the first update: the moving reference is task.reference
    resuming = ckpt_lib.Checkpointer.exists(workdir)
    # the policy starts from Stage 1. The train step donates its params: a copy where they are the reference's too
    # ("stage1"); the "base" reference holds none of them, so they are handed over (no second copy held)
    base, start = lora_state if lora_state else (None, s1_tree)
    del s1_tree, lora_state
    if resuming:
        init = None
    elif which == "stage1":
        init = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ms.shardings)(start)
    else:
        init = start
    del start
    summary = train.run(c, workdir, task, ms, init_params=init, frozen=base, settings=train_settings(c))
    summary.update(stage1=s1, reference=which, reference_weights=ref_desc)
    if c.stage2.precompute_ref:
        summary["ref_logps_cache"] = cache
    return summary, ref_params if sync is None else task.reference
