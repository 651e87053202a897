"""Metrics to WORKDIR/metrics.jsonl (one JSON object per write) and TensorBoard event files (tensorboardX, no TF).

The workdir may be a local path or an etils.epath URL (gs://...). A local metrics.jsonl is appended to; object
stores have no append, so there the file is rewritten whole (earlier lines kept) at each write. tensorboardX writes
gs:// event files itself (it needs the google-cloud-storage package for that). Multi-host runs enable the writer on
process 0 only (train.run).
"""
from __future__ import annotations

import json
import os
import time

from etils import epath


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        root = epath.Path(os.fspath(workdir))
        self.jsonl_path = os.fspath(root / "metrics.jsonl")
        self.tb_dir = os.fspath(root / "tensorboard")
        self._url = "://" in self.jsonl_path
        self._lines: list[str] | None = None  # URL workdirs: the file's lines, rewritten whole at each write
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "time": time.time(), **scalars}) + "\n"
        if self._url:
            path = epath.Path(self.jsonl_path)
            if self._lines is None:  # a resumed run continues the file
                self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            self._lines.append(line)
            path.write_text("".join(self._lines))
        else:
            with open(self.jsonl_path, "a") as f:
                f.write(line)
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
