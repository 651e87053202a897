"""Pure loss functions. Log-probabilities are computed in float32 whatever the activation dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, t] | prefix) for every position, float32 [B, T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def sequence_logprobs(logits, targets, weights):
    """Summed log-prob of the weighted (target) tokens of each row: float32 [B]."""
    return jnp.sum(token_logprobs(logits, targets) * weights, axis=-1)


def window_logits(model, hidden, batch):
    """(logits, targets, weights) on the batch's target window (data.pipeline.add_window) when it has one: the LM
    head and the softmax run on W positions per row instead of L. Without a window: every position."""
    if "win_idx" not in batch:
        return model.logits(hidden), batch["targets"], batch["weights"]
    h = jnp.take_along_axis(hidden, batch["win_idx"][..., None], axis=1)
    return model.logits(h), batch["win_targets"], batch["win_weights"]


def sft_loss_sums(logits, targets, weights, task, num_tasks: int):
    """Cross-entropy on target tokens only, as sums so that micro-batches and devices add up exactly.

    Returns (total_nll, total_tokens, per_task_nll [num_tasks], per_task_tokens [num_tasks]).
    """
    nll = -token_logprobs(logits, targets) * weights  # [B, T]
    row_nll, row_tok = nll.sum(-1), weights.sum(-1)
    onehot = jax.nn.one_hot(task, num_tasks, dtype=jnp.float32)  # [B, K]
    return row_nll.sum(), row_tok.sum(), onehot.T @ row_nll, onehot.T @ row_tok


# ------------------------------------------------------------------------------------------------------------ DPO
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss_sums(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                  label_smoothing=0.0, valid=None, loss_type="sigmoid"):
    """DPO (Rafailov et al., 2023) as sums, so that micro-batches and devices add up exactly.

    Inputs are float32 [B] summed response log-probs. With the implicit rewards
    r_c = beta * (pc - rc) and r_r = beta * (pr - rr), logits = r_c - r_r and the per-pair loss is
    -(1 - ls) * log_sigmoid(logits) - ls * log_sigmoid(-logits) (conservative DPO; ls = 0 is plain DPO).
    loss_type "ipo" (Azar et al. 2023, "A general theoretical paradigm to understand learning from human
    preferences", eq. 17): (h - 1 / (2 beta))^2 with h = (pc - rc) - (pr - rr), the log-ratio margin of the summed
    log-probs; beta plays the role of their tau and label_smoothing is not used. IPO regresses the margin to a
    finite target instead of pushing it to infinity, so it does not drive the rejected reply's log-prob (and, with
    it, the shared tokens of the chosen one) down without bound.
    The reference log-probs are used as given: a caller that must not train through them wraps them in
    jax.lax.stop_gradient.

    Returns (loss_sum, num_pairs as float32, metric_sums) where metric_sums holds the sums over pairs of
    "rewards_chosen", "rewards_rejected", "reward_margin" (r_c - r_r), "reward_accuracy" (r_c > r_r as 0/1) and
    the policy's "logps_chosen" and "logps_rejected";
    divide every sum by num_pairs for the means. `valid` [B] (default all) leaves padding pairs out of every sum
    and of num_pairs.
    """
    f32 = jnp.float32
    pc, pr = jnp.asarray(policy_chosen_logps, f32), jnp.asarray(policy_rejected_logps, f32)
    rc, rr = jnp.asarray(ref_chosen_logps, f32), jnp.asarray(ref_rejected_logps, f32)
    beta = jnp.asarray(beta, f32)
    ls = jnp.asarray(label_smoothing, f32)
    reward_chosen = beta * (pc - rc)
    reward_rejected = beta * (pr - rr)
    # Same as reward_chosen - reward_rejected, written as in the paper: beta * (policy ratio - reference ratio).
    logits = beta * ((pc - rc) - (pr - rr))
    if loss_type == "sigmoid":
        per_pair = -(1.0 - ls) * jax.nn.log_sigmoid(logits) - ls * jax.nn.log_sigmoid(-logits)
    elif loss_type == "ipo":
        per_pair = jnp.square((pc - rc) - (pr - rr) - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"stage2.loss_type = {loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    margin = reward_chosen - reward_rejected
    w = jnp.ones_like(per_pair) if valid is None else jnp.asarray(valid, f32)
    metric_sums = {
        "rewards_chosen": (reward_chosen * w).sum(),
        "rewards_rejected": (reward_rejected * w).sum(),
        "reward_margin": (margin * w).sum(),
        "reward_accuracy": ((reward_chosen > reward_rejected).astype(f32) * w).sum(),
        "logps_chosen": (pc * w).sum(),  # the policy's summed log-prob of the chosen reply (DPO can lower it)
        "logps_rejected": (pr * w).sum(),
    }
    return (per_pair * w).sum(), w.sum(), metric_sums


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, loss_type="sigmoid"):
    """Mean DPO loss over the batch and mean metrics; see dpo_loss_sums for the formula. Returns (loss, metrics)."""
    loss_sum, n, metric_sums = dpo_loss_sums(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                             ref_rejected_logps, beta, label_smoothing, loss_type=loss_type)
    n = jnp.maximum(n, 1.0)
    return loss_sum / n, {k: v / n for k, v in metric_sums.items()}


# ------------------------------------------------------------------------------------------ embedding alignment
_NORM_EPS = 1e-6
_MASKED_LOGIT = -1e30  # finite "minus infinity": exp underflows to 0, and no NaN when a whole row is masked


def pooled_embeddings(hidden, mask):
    """Masked mean of hidden [B, T, D] over T, in float32: [B, D].

    mask [B, T] may be bool or float (float entries act as weights). Values at masked positions are ignored
    (even inf/NaN there), and a row whose mask is all zero pools to zeros.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    keep = (mask != 0)[..., None]
    weighted = jnp.where(keep, hidden.astype(jnp.float32) * mask[..., None], 0.0)
    total = weighted.sum(axis=1)  # [B, D]
    count = mask.sum(axis=1, keepdims=True)  # [B, 1]
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1.0), 0.0)


def _l2_normalize(x):
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


def embedding_alignment_sums(persona_emb, response_emb, temperature, valid=None):
    """In-batch InfoNCE between responses and personas, as sums over the valid rows.

    persona_emb, response_emb: [B, D] (any float dtype; computed in float32). Both are L2-normalised
    (eps-safe, so an all-zero row stays zero), logits = response_n @ persona_n.T / temperature, and row i's
    loss is the cross-entropy of softmax(logits[i]) against target i: each response is pulled toward its own
    persona and pushed away from the other personas of the batch. valid [B] (bool or 0/1; None = all valid)
    removes padded rows both as anchors and as negatives.

    Because the negatives are the other rows of the batch given here, a trainer that accumulates these sums
    over micro-batches gets an InfoNCE whose negatives are those of each micro-batch (not of the full batch):
    the result then depends on the micro-batch size.

    Returns (loss_sum, num_valid as float32, metric_sums) with metric_sums summed over valid rows:
    "align_accuracy" (argmax of the row == its own persona), "align_pos_cos" (cosine of the matching pair),
    "align_neg_cos" (the row's mean cosine to the other valid personas, 0 where it has none). Dividing each by
    num_valid gives the means; for one batch the mean of "align_neg_cos" equals the mean over all
    non-matching valid pairs, since every valid row has the same number of negatives.
    """
    p = _l2_normalize(persona_emb)
    r = _l2_normalize(response_emb)
    b = p.shape[0]
    if valid is None:
        valid = jnp.ones((b,), bool)
    else:
        valid = jnp.asarray(valid) != 0
    validf = valid.astype(jnp.float32)

    cos = r @ p.T  # [B, B] cosine(response_i, persona_j)
    logits = cos / jnp.asarray(temperature, jnp.float32)
    logits = jnp.where(valid[None, :], logits, _MASKED_LOGIT)
    logp = jax.nn.log_softmax(logits, axis=-1)
    eye = jnp.eye(b, dtype=bool)
    per_row = -jnp.diagonal(logp)
    loss_sum = jnp.sum(jnp.where(valid, per_row, 0.0))

    correct = (jnp.argmax(logits, axis=-1) == jnp.arange(b)).astype(jnp.float32)
    pos_cos = jnp.diagonal(cos)
    neg_mask = (valid[:, None] & valid[None, :] & ~eye).astype(jnp.float32)
    neg_count = neg_mask.sum(axis=-1)
    neg_cos = (cos * neg_mask).sum(axis=-1) / jnp.maximum(neg_count, 1.0)
    metric_sums = {
        "align_accuracy": jnp.sum(correct * validf),
        "align_pos_cos": jnp.sum(jnp.where(valid, pos_cos, 0.0)),
        "align_neg_cos": jnp.sum(jnp.where(valid, neg_cos, 0.0)),
    }
    return loss_sum, validf.sum(), metric_sums


def embedding_alignment_loss(persona_emb, response_emb, temperature, valid=None):
    """Mean in-batch InfoNCE over the valid rows and mean metrics; see embedding_alignment_sums.

    Returns (loss, metrics); with no valid row the loss and metrics are 0.
    """
    loss_sum, n, metric_sums = embedding_alignment_sums(persona_emb, response_emb, temperature, valid)
    n = jnp.maximum(n, 1.0)
    return loss_sum / n, {k: v / n for k, v in metric_sums.items()}
