"""What every mode sets up the same way: mesh, corpus splits, tokenizer, model state."""
from __future__ import annotations



from pal_jax.core import mesh as mesh_lib
from pal_jax.core import preemption
from pal_jax.data import corpus as corpus_lib
from pal_jax.model import lora as lora_lib
from pal_jax.model.spec import ModelSpec, model_config
from pal_jax.weights.tokenizers import get_tokenizer


class Experiment:
    def __init__(self, config, workdir: str, need_corpus: bool = True, devices=None):
        self.config, self.workdir = config, workdir
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rules = mesh_lib.axis_rules(config)
        with preemption.phase("loading the data and the tokenizer (nothing half-written: rerun to redo it)"):
            self.corpus = corpus_lib.load_corpus(config.data) if need_corpus else None
            self.tokenizer = get_tokenizer(config, workdir, self.corpus["train"] if self.corpus else None)
        self.model_cfg = model_config(config.model, self.tokenizer.vocab_size)
        # with config.lora.rank > 0 the model carries adapters and trains only them (pal_jax/model/lora.py)
        self.model = ModelSpec(self.model_cfg, self.mesh, self.rules, lora=lora_lib.lora_config(config))
