"""Evaluation: the metrics, the bootstrap, the report, the NLI C-score and the sentence-encoder proxy."""
