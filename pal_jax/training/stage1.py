"""Stage 1, Persona-aware Learning: multi-task SFT over select and generate examples, loss on target tokens.

With config.lora.rank > 0 only LoRA adapters are trained, on the frozen base of config.init_from (pal_jax/model/lora.py).
"""
from __future__ import annotations

import logging

import jax.numpy as jnp

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.data import pipeline
from pal_jax.model import logprobs
from pal_jax.training import loop as train
from pal_jax.training import losses, samples
from pal_jax.training.experiment import Experiment
from pal_jax.weights import init_from


def sft_loss_fn(model, batch, extra):
    """Summed NLL of the target tokens (train.LossFn). A packed batch (data.packing: pipeline.PackedBatchSource)
    carries segment_ids (attention stays inside each example) and win_task, the task of each window token."""
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"], segment_ids=batch.get("segment_ids"))
    logits, targets, weights = logprobs.window_logits(model, hidden, batch)
    task = batch["win_task"] if "win_task" in batch else batch["task"]
    nll, tok, task_nll, task_tok = losses.sft_loss_sums(logits, targets, weights, task, len(pipeline.TASKS))
    mets = {}
    # per-task mean losses: logged as sum/den, so scale each task's mean back by den/tokens-of-task
    for i, name in enumerate(pipeline.TASKS):
        mets[f"{name}_loss"] = task_nll[i] / jnp.maximum(task_tok[i], 1.0) * tok
    return nll, tok, mets


def encode_split(exp: Experiment, dialogues, split: str) -> pipeline.Encoded:
    """The split's select and generate rows; the training split's persona tokens weighted by data.persona_weight
    (the held-out loss stays plain NLL, comparable across settings)."""
    d = exp.config.data
    weight = d.persona_weight if split == "train" else 1.0
    enc = pipeline.encode_examples(pipeline.stage1_examples(dialogues), exp.tokenizer, d.max_len, weight)
    logging.info("data %s: %d examples; %d with the prompt cut to fit %d tokens; %d dropped "
                 "(target alone too long)%s", split, len(enc.ids), enc.n_truncated, d.max_len, enc.n_dropped,
                 f"; {enc.n_persona_tokens} persona tokens weighted x{weight:g}" if weight != 1.0 else "")
    return enc


def build_task(exp: Experiment) -> train.Task:
    c = exp.config
    enc_train = encode_split(exp, exp.corpus["train"], "train")
    enc_dev = encode_split(exp, exp.corpus["dev"], "dev")
    buckets = tuple(c.data.buckets)
    packing = bool(c.data.get("packing", False))  # several examples per row (pipeline.PackedBatchSource)
    src = pipeline.batch_source(enc_train, c.train.batch_size, buckets, c.seed, c.data.select_ratio, packing)
    dev = pipeline.batch_source(enc_dev, c.train.batch_size, buckets, c.seed, packing=packing)
    info = {"seed": c.seed, "train_examples": len(enc_train.ids), "dev_examples": len(enc_dev.ids),
            "steps_per_epoch": src.steps_per_epoch, "truncated": enc_train.n_truncated,
            "dropped": enc_train.n_dropped, "packing": packing}
    if packing:
        logging.info("data: packing %d examples into rows of %d positions: %d steps in epoch 0 (%d examples a "
                     "step on average; loss window %d target tokens a row)", len(enc_train.ids), src.capacity,
                     src.steps_per_epoch, src.epoch_size // max(src.steps_per_epoch, 1), src.target_cap)
    return train.Task(name="stage1", loss_fn=sft_loss_fn, train_batch=src.batch, eval_batches=dev.eval_batches,
                      data_info=info, sample=samples.make_sampler(c, exp.model, exp.tokenizer, exp.corpus["dev"]))


def initial_params(exp: Experiment):
    """Params of config.init_from (a pal_jax workdir, a Hugging Face dir, a GGUF file; see init_from.py) on
    this run's mesh, or None for a random init. With LoRA use init_from.initial_state (base and adapters)."""
    return init_from.load(exp.config.init_from, exp.model)


def run(config, workdir: str, devices=None) -> dict:
    exp = Experiment(config, workdir, devices=devices)
    task = build_task(exp)
    resuming = ckpt_lib.Checkpointer.exists(workdir)
    if exp.model.lora is not None:  # the base (frozen) from init_from; the adapters fresh, or restored on resume
        base, adapters = init_from.initial_state(config.init_from, exp.model, config.seed)
        return train.run(config, workdir, task, exp.model, init_params=None if resuming else adapters, frozen=base)
    return train.run(config, workdir, task, exp.model, init_params=None if resuming else initial_params(exp))
