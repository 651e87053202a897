"""Pure loss functions, written as sums (numerator, denominator, metric sums) so that micro-batches and devices add
up exactly. Log-probabilities (pal_jax/model/logprobs.py) are float32 whatever the activation dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pal_jax.model.logprobs import token_logprobs

# the names and the stage2.loss_type syntax live in the jax-free loss_spec (config.py validates with them)
from pal_jax.training.loss_spec import DPO_LOSS_TYPES, parse_loss_type  # noqa: F401  (DPO_LOSS_TYPES re-exported)


def sft_loss_sums(logits, targets, weights, task, num_tasks: int):
    """Cross-entropy on target tokens only, as sums so that micro-batches and devices add up exactly.

    task: int [B], the task of each row, or [B, T], of each token (packed rows mix tasks: data.packing).
    Returns (total_nll, total_tokens, per_task_nll [num_tasks], per_task_tokens [num_tasks]).
    """
    nll = -token_logprobs(logits, targets) * weights  # [B, T]
    if task.ndim == 2:
        onehot = jax.nn.one_hot(task, num_tasks, dtype=jnp.float32)  # [B, T, K]
        return (nll.sum(), weights.sum(), jnp.einsum("bt,btk->k", nll, onehot),
                jnp.einsum("bt,btk->k", weights, onehot))
    row_nll, row_tok = nll.sum(-1), weights.sum(-1)
    onehot = jax.nn.one_hot(task, num_tasks, dtype=jnp.float32)  # [B, K]
    return row_nll.sum(), row_tok.sum(), onehot.T @ row_nll, onehot.T @ row_tok


# ------------------------------------------------------------------------------------------------------------ DPO
def dpo_per_pair(loss_type, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 beta, label_smoothing=0.0, chosen_tokens=None, rejected_tokens=None, norm_use_reference=True,
                 gamma=0.0):
    """The per-pair loss [B] of one preference loss named loss_type (a name of DPO_LOSS_TYPES), float32.

    Inputs are [B] summed response log-probs: policy pc, pr and reference rc, rr of the chosen and rejected reply.
    h = (pc - rc) - (pr - rr) is the log-ratio margin and ls = label_smoothing.

    - "sigmoid": DPO, Rafailov et al. 2023 ("Direct Preference Optimization: Your language model is secretly a
      reward model", eq. 7), with conservative label smoothing (Mitchell 2023, "A note on DPO with noisy
      preferences"): -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h); ls = 0 is plain DPO.
    - "ipo": Azar et al. 2023 ("A general theoretical paradigm to understand learning from human preferences",
      eq. 17): (h - 1 / (2 beta))^2; beta plays the role of their tau. It regresses the margin to a finite target
      instead of pushing it to infinity. ls is not used.
    - "hinge": SLiC, Zhao et al. 2023 ("SLiC-HF: Sequence likelihood calibration with human feedback"): its rank
      calibration loss max(0, delta - log p(y+) + log p(y-)) on DPO's scaled log-ratio margin with delta = 1:
      max(0, 1 - beta h). ls is not used.
    - "robust": rDPO, Ray Chowdhury et al. 2024 ("Provably robust DPO: aligning language models with noisy
      feedback"), with eps = ls the probability that a preference label is flipped:
      ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps), an unbiased estimate of the
      clean-label DPO loss. eps = 0 is plain DPO (config keeps eps < 0.5).
    - "sigmoid_norm": DPO on length-normalised log-probs, each side's policy and reference log-prob divided by its
      number of target tokens (chosen_tokens, rejected_tokens [B], required; a count below 1 counts as 1):
      h_n = (pc - rc) / nc - (pr - rr) / nr; with norm_use_reference=False the reference terms are dropped,
      h_n = pc / nc - pr / nr, which is SimPO (Meng et al. 2024, "SimPO: Simple preference optimization with a
      reference-free reward") with its target reward margin gamma: logits = beta h_n - gamma and the loss
      -(1 - ls) log sigmoid(logits) - ls log sigmoid(-logits) (ls = 0, as in the paper, by default).
    - "apo_zero": APO-zero, D'Oosterlinck et al. 2024 ("Anchored preference optimization and contrastive
      revisions"): with r_c = beta (pc - rc) and r_r = beta (pr - rr), (1 - sigmoid(r_c)) + sigmoid(r_r) (the
      paper's -sigmoid(r_c) + sigmoid(r_r), plus 1 so that it is >= 0): it raises the chosen reply's likelihood
      and lowers the rejected one's, each against the reference, instead of only their difference. ls is not
      used.
    """
    f32 = jnp.float32
    pc, pr = jnp.asarray(policy_chosen_logps, f32), jnp.asarray(policy_rejected_logps, f32)
    rc, rr = jnp.asarray(ref_chosen_logps, f32), jnp.asarray(ref_rejected_logps, f32)
    beta = jnp.asarray(beta, f32)
    ls = jnp.asarray(label_smoothing, f32)
    h = (pc - rc) - (pr - rr)

    def smoothed_sigmoid(logits):
        return -(1.0 - ls) * jax.nn.log_sigmoid(logits) - ls * jax.nn.log_sigmoid(-logits)

    if loss_type == "sigmoid":
        return smoothed_sigmoid(beta * h)
    if loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * h)
    if loss_type == "robust":
        return ((1.0 - ls) * -jax.nn.log_sigmoid(beta * h) - ls * -jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * ls)
    if loss_type == "sigmoid_norm":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("stage2.loss_type = 'sigmoid_norm' needs the chosen and rejected target token counts")
        nc = jnp.maximum(jnp.asarray(chosen_tokens, f32), 1.0)
        nr = jnp.maximum(jnp.asarray(rejected_tokens, f32), 1.0)
        if norm_use_reference:
            h_n = (pc - rc) / nc - (pr - rr) / nr
        else:
            h_n = pc / nc - pr / nr
        return smoothed_sigmoid(beta * h_n - jnp.asarray(gamma, f32))
    if loss_type == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * (pc - rc))) + jax.nn.sigmoid(beta * (pr - rr))
    raise ValueError(f"stage2.loss_type = {loss_type!r}: expected one of {DPO_LOSS_TYPES}")


def dpo_loss_sums(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                  label_smoothing=0.0, valid=None, loss_type="sigmoid", chosen_tokens=None, rejected_tokens=None,
                  norm_use_reference=True, gamma=0.0):
    """A preference loss (DPO and its variants) as sums, so that micro-batches and devices add up exactly.

    Inputs are float32 [B] summed response log-probs. loss_type is a stage2.loss_type value: one name of
    DPO_LOSS_TYPES (formulas and sources: dpo_per_pair), or a comma-separated list "name:weight,..." (or the
    parsed ((name, weight), ...)) whose per-pair losses are added with those weights. chosen_tokens and
    rejected_tokens [B] (the target token counts) are needed by "sigmoid_norm" only; norm_use_reference and gamma
    are its options. The reference log-probs are used as given: a caller that must not train through them wraps
    them in jax.lax.stop_gradient.

    Returns (loss_sum, num_pairs as float32, metric_sums) where metric_sums holds the sums over pairs of
    "rewards_chosen", "rewards_rejected" (the implicit DPO rewards r_c = beta * (pc - rc), r_r = beta * (pr - rr)
    of the summed log-probs, whatever the loss type), "reward_margin" (r_c - r_r), "reward_accuracy" (r_c > r_r as
    0/1) and the policy's "logps_chosen" and "logps_rejected";
    divide every sum by num_pairs for the means. `valid` [B] (default all) leaves padding pairs out of every sum
    and of num_pairs.
    """
    f32 = jnp.float32
    pc, pr = jnp.asarray(policy_chosen_logps, f32), jnp.asarray(policy_rejected_logps, f32)
    rc, rr = jnp.asarray(ref_chosen_logps, f32), jnp.asarray(ref_rejected_logps, f32)
    beta_ = jnp.asarray(beta, f32)
    per_pair = None
    for name, weight in parse_loss_type(loss_type):
        term = dpo_per_pair(name, pc, pr, rc, rr, beta, label_smoothing, chosen_tokens, rejected_tokens,
                            norm_use_reference, gamma)
        term = term if weight == 1.0 else weight * term
        per_pair = term if per_pair is None else per_pair + term
    reward_chosen = beta_ * (pc - rc)
    reward_rejected = beta_ * (pr - rr)
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
             label_smoothing=0.0, loss_type="sigmoid", **kw):
    """Mean DPO loss over the batch and mean metrics; see dpo_loss_sums (kw: its token counts and sigmoid_norm
    options). Returns (loss, metrics)."""
    loss_sum, n, metric_sums = dpo_loss_sums(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                             ref_rejected_logps, beta, label_smoothing, loss_type=loss_type, **kw)
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
