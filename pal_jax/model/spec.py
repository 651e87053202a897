"""The model spec: a model's graph, abstract params and their shardings on a mesh (no params; what every stage,
the loaders and the exporters build the model from), and the model config resolved against a tokenizer."""
from __future__ import annotations

import math

import jax
from flax import nnx

from pal_jax.core import checkpoint as ckpt_lib
from pal_jax.core import mesh as mesh_lib
from pal_jax.model import lora as lora_lib
from pal_jax.model.transformer import LoraConfig, ModelConfig, Transformer


def model_config(model_section, vocab_size: int, attention: str | None = None) -> ModelConfig:
    """config.model (or a checkpoint's saved copy) with vocab_size 0 resolved to the tokenizer's. attention: the
    running config's model.attention, which replaces a saved copy's (or its absence, in checkpoints written before
    the key existed): how attention is computed is this run's choice, not a property of the weights."""
    d = dict(model_section)
    if attention is not None:
        d["attention"] = attention
    if d["vocab_size"] == 0:
        d["vocab_size"] = vocab_size
    elif d["vocab_size"] < vocab_size:
        raise ValueError(f"config.model.vocab_size = {d['vocab_size']}: expected >= the tokenizer's vocabulary "
                         f"size {vocab_size} (or 0 to take it from the tokenizer)")
    return ModelConfig.from_dict(d)


class ModelSpec:
    """The model's graph, its abstract params and their shardings on a mesh.

    `abstract`, `shardings` and `init(seed)` describe the params the optimizer trains and the checkpoints hold.
    Without LoRA that is every param. With `lora` (a model.LoraConfig) it is the adapters only, and the frozen base
    has `frozen_abstract`, `frozen_shardings` and `init_frozen(seed)` (the same values as the plain model's init);
    `merge(params, frozen)` builds the model from both. `graphdef` merges one tree holding every param (base and
    adapters: pal_jax.model.lora.combine), as the samplers and the Stage 2 reference call nnx.merge(graphdef, tree)."""

    def __init__(self, cfg: ModelConfig, mesh, rules, lora: LoraConfig | None = None):
        self.cfg, self.mesh, self.rules, self.lora = cfg, mesh, rules, lora
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), lora=lora))
        self.graphdef, abstract_state = nnx.split(abstract, nnx.Param)
        shardings = mesh_lib.param_shardings(abstract_state, mesh, rules)
        full = ckpt_lib.abstract_like(nnx.to_pure_dict(abstract_state), shardings)
        if lora is None:
            self.shardings, self.abstract = shardings, full
            self.frozen_shardings = self.frozen_abstract = None
        else:
            self.shardings, self.frozen_shardings = lora_lib.split(shardings)
            self.abstract, self.frozen_abstract = lora_lib.split(full)

    def _init_all(self, seed: int):
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, rngs=nnx.Rngs(seed), lora=self.lora), nnx.Param))

    def init(self, seed: int):
        """The trainable params from a random init (with LoRA: the adapters, A random and B zero)."""
        if self.lora is None:
            return jax.jit(lambda: self._init_all(seed), out_shardings=self.shardings)()
        return jax.jit(lambda: lora_lib.split(self._init_all(seed))[0], out_shardings=self.shardings)()

    def init_frozen(self, seed: int):
        """With LoRA: a random base, equal to the plain model's init(seed)."""
        return jax.jit(lambda: lora_lib.split(self._init_all(seed))[1], out_shardings=self.frozen_shardings)()

    def merge(self, params, frozen=None) -> Transformer:
        """The model from its params; with LoRA, from the adapters `params` and the base `frozen` (or, with frozen
        None, from one tree holding both)."""
        if frozen is not None:
            params = lora_lib.combine(frozen, params)
        return nnx.merge(self.graphdef, params)

    def plain(self) -> "ModelSpec":
        """This model without adapters, on the same mesh (what merged LoRA params fit)."""
        return self if self.lora is None else ModelSpec(self.cfg, self.mesh, self.rules)

    def n_params(self) -> int:
        """Trainable params (with LoRA: the adapters)."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract))

    def n_frozen(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.frozen_abstract))
