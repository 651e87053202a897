"""Prediction records in and out: the records a prediction or evaluation reads (a ConvAI2 file, JSONL, or the
corpus's predict.split) and the predictions JSONL it writes."""
from __future__ import annotations

import logging
from typing import Sequence

from pal_jax.core import atomic
from pal_jax.data import convai2, corpus
from pal_jax.data import labels as labels_lib


def load_records(config):
    """Records to predict on: config.predict.input (ConvAI2 text or JSONL, told apart by content, not by name) or
    the corpus's predict.split (test by default; dev for tuning)."""
    path = config.predict.input
    if path and convai2.looks_like_jsonl(path):
        records, origin = convai2.read_jsonl(path), path
    else:
        if path:
            dialogues, origin = convai2.read_convai2(path), path
            labels_lib.label_dialogues(dialogues, labels_lib.get_labeler(config.data.labeler))
        else:
            split = config.predict.get("split", "test")
            dialogues = corpus.load_corpus(config.data)[split]
            origin = f"{config.data.source} {split} split"
        records = convai2.records_from_dialogues(dialogues)
    if config.predict.max_records:
        records = records[:config.predict.max_records]
    return records, origin


def write_predictions(path: str, records, predictions: Sequence) -> None:
    """JSONL: one object per record with the selection, its score, every candidate's score and the response."""
    atomic.write_jsonl(path, ({"id": getattr(r, "id", None), "persona": list(r.persona), "history": list(r.history),
                               "selected_persona": p.selected, "selected_text": p.selected_text,
                               "select_score": p.select_score, "candidate_scores": p.candidate_scores,
                               "candidate_features": getattr(p, "features", {}), "response": p.response}
                              for r, p in zip(records, predictions)))
    logging.info("predictions: %d records -> %s", len(predictions), path)
