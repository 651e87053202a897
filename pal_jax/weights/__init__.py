"""Weights in and out: Hugging Face safetensors (per-family key tables, import and export), GGUF, what init_from
names, and the one tokenizer resolver."""
