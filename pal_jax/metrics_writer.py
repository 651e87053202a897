"""Metrics to WORKDIR/metrics.jsonl (one JSON object per write) and TensorBoard event files (tensorboardX, no TF).

The workdir may be a local path or an etils.epath URL (gs://...). A local metrics.jsonl is appended to; object
stores have no append, so there the file is rewritten whole (earlier lines kept) at each write. tensorboardX writes
gs:// event files itself (it needs the google-cloud-storage package for that). Multi-host runs enable the writer on
process 0 only (train.run).

A run that starts from step S (a resumed run: its restored checkpoint's step; a fresh run: 0) first drops the rows
of metrics.jsonl after step S, which an interrupted run wrote after its last checkpoint and the new run writes
again, and opens TensorBoard with purge_step S + 1, which hides the old events from step S + 1 on.
"""
from __future__ import annotations

import json
import logging
import os
import time

from etils import epath


def _step_of(line: str) -> int | None:
    """A metrics.jsonl row's step; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
        """start_step: the step the run starts from; rows and events after it are superseded (module doc)."""
        self.enabled = enabled
        root = epath.Path(os.fspath(workdir))
        self.jsonl_path = os.fspath(root / "metrics.jsonl")
        self.tb_dir = os.fspath(root / "tensorboard")
        self._url = "://" in self.jsonl_path
        self._lines: list[str] | None = None  # URL workdirs: the file's lines, rewritten whole at each write
        self._tb = None
        if enabled:
            if start_step is not None:
                self._drop_after(start_step)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tb_dir, purge_step=None if start_step is None else start_step + 1)

    def _drop_after(self, step: int) -> None:
        path = epath.Path(self.jsonl_path)
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [x for x in lines if _step_of(x) is not None and _step_of(x) <= step]
        if len(keep) == len(lines):
            return
        logging.info("metrics: dropped %d rows after step %d (or cut short) from %s: written after the last "
                     "checkpoint of an interrupted run; this run writes them again", len(lines) - len(keep), step,
                     self.jsonl_path)
        if self._url:
            path.write_text("".join(keep))
            return
        tmp = f"{self.jsonl_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(keep))
        os.replace(tmp, self.jsonl_path)

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
