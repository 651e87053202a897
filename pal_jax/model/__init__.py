"""The model: its config, the transformer (nnx), the model spec (graph, abstract shapes, shardings), LoRA tree
operations, token log-probs and the tokenizer."""
