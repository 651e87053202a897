"""Metrics to WORKDIR/metrics.jsonl (one JSON object per write) and TensorBoard event files (tensorboardX, no TF)."""
from __future__ import annotations

import json
import os
import time


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
