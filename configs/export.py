"""Export a trained checkpoint as a Hugging Face model directory (config.json, model.safetensors, tokenizer).

    python -m pal_jax.main --config=configs/export.py:tiny --workdir=STAGE1_OR_STAGE2_WORKDIR \
        [--config.export.output_dir=/path/to/hf_model]

The model's shape comes from the checkpoint's saved config (the preset only fills the other keys); the output loads
with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained.
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("export", preset or "tiny")
