"""Load the configured corpus, fill missing persona labels, and split it by dialogue."""
from __future__ import annotations

import logging

import numpy as np

from pal_jax.data import convai2, labels, synthetic

SPLITS = ("train", "dev", "test")
SOURCES = ("synthetic", "convai2", "jsonl", "tfds")  # data.source: read_dialogues reads each


def split_dialogues(dialogues, dev_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """Split by dialogue, never by turn: a seeded permutation of dialogue positions, test first, then dev.

    The same (dialogues, fractions, seed) always gives the same split, so the test part stays untouched by training.
    """
    n = len(dialogues)
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_dev = int(round(n * dev_fraction))
    parts = {"test": order[:n_test], "dev": order[n_test:n_test + n_dev], "train": order[n_test + n_dev:]}
    out = {k: [dialogues[i] for i in sorted(v)] for k, v in parts.items()}
    for k in SPLITS:
        if not out[k] and (k == "train" or (k == "dev" and dev_fraction > 0) or (k == "test" and test_fraction > 0)):
            raise convai2.DataError(f"data split {k!r} is empty: {n} dialogues with dev_fraction={dev_fraction}, "
                             f"test_fraction={test_fraction}; expected enough dialogues for every split")
    return out


def origin(data_config) -> str:
    """Where the configured corpus comes from, as read_dialogues names it."""
    if data_config.source == "synthetic":
        return f"synthetic(n={data_config.synthetic_dialogues}, seed={data_config.synthetic_seed})"
    if data_config.source == "tfds":
        return (f"tfds {data_config.path} convai2_persona/{data_config.get('tfds_config', 'self_original')} split "
                f"{data_config.tfds_split!r}")
    return data_config.path


def read_dialogues(data_config):
    if data_config.source == "synthetic":
        dialogues = synthetic.generate_corpus(data_config.synthetic_dialogues, data_config.synthetic_seed)
    elif data_config.source == "convai2":
        dialogues = convai2.read_convai2(data_config.path)
    elif data_config.source == "jsonl":
        # one turn a line (persona, history, response, optional persona_label); grouped into dialogues by
        # 'dialogue_id', or by persona when the rows carry none (convai2.read_jsonl_dialogues)
        dialogues = convai2.read_jsonl_dialogues(data_config.path)
    elif data_config.source == "tfds":
        # A dataset built by tfds_builder.build, read through tfds.data_source + Grain (no TensorFlow). The
        # dialogues come back in file order with their file ids and labels, so the split below, and the batch
        # order of Stage 1 (a pure function of (seed, step) over them), match source=convai2 on the same file.
        from pal_jax.data import tfds_builder  # imports tensorflow_datasets: only when asked for
        split, name = data_config.tfds_split, data_config.get("tfds_config", "self_original")
        dialogues = tfds_builder.load_dialogues(data_config.path, split, config=name, labeler=data_config.labeler)
    else:
        raise ValueError(f"config.data.source = {data_config.source!r}: expected one of {SOURCES}")
    labeler = labels.get_labeler(data_config.labeler)
    labels.label_dialogues(dialogues, labeler)
    return dialogues, origin(data_config)


def load_corpus(data_config) -> dict[str, list]:
    dialogues, where = read_dialogues(data_config)
    splits = split_dialogues(dialogues, data_config.dev_fraction, data_config.test_fraction, data_config.split_seed)
    logging.info("data: %s: %d dialogues -> %s", where, len(dialogues),
                 ", ".join(f"{k} {len(v)} dialogues / {sum(len(d.turns) for d in v)} turns" for k, v in splits.items()))
    return splits
