"""Select then Generate: KV-cache decoding and candidate scoring, the selection rules, the Predictor."""
