"""Metrics to WORKDIR/metrics.jsonl (one JSON object per write), the training samples (pal_jax/training/samples.py) to
WORKDIR/samples.jsonl (one JSON object per sampled turn), and both to TensorBoard event files (tensorboardX, no TF:
scalars, and the samples as a text summary).

The workdir may be a local path or an etils.epath URL (gs://...). A local JSONL file is appended to; object stores
have no append, so there the file is rewritten whole (earlier lines kept) at each write. tensorboardX writes gs://
event files itself (it needs the google-cloud-storage package for that). Multi-host runs enable the writer on
process 0 only (train.run).

A run that starts from step S (a resumed run: its restored checkpoint's step; a fresh run: 0) first drops the rows
of metrics.jsonl and samples.jsonl after step S, which an interrupted run wrote after its last checkpoint and the
new run writes again, and opens TensorBoard with purge_step S + 1, which hides the old events (scalars and text)
from step S + 1 on.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pal_jax.core import atomic

from etils import epath


def _step_of(line: str) -> int | None:
    """A metrics.jsonl row's step; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _JsonlFile:
    """An append-only JSONL file whose rows each hold a "step" (local: appended; URL: rewritten whole)."""

    def __init__(self, path: str):
        self.path = path
        self._url = "://" in path
        self._lines: list[str] | None = None  # URL workdirs: the file's lines, rewritten whole at each write

    def drop_after(self, step: int) -> None:
        path = epath.Path(self.path)
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [x for x in lines if _step_of(x) is not None and _step_of(x) <= step]
        if len(keep) == len(lines):
            return
        logging.info("metrics: dropped %d rows after step %d (or cut short) from %s: written after the last "
                     "checkpoint of an interrupted run; this run writes them again", len(lines) - len(keep), step,
                     self.path)
        if self._url:
            path.write_text("".join(keep))
            return
        atomic.write_text(self.path, "".join(keep))

    def append(self, lines: list[str]) -> None:
        if self._url:
            path = epath.Path(self.path)
            if self._lines is None:  # a resumed run continues the file
                self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            self._lines.extend(lines)
            path.write_text("".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write("".join(lines))


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
        """start_step: the step the run starts from; rows and events after it are superseded (module doc)."""
        self.enabled = enabled
        root = epath.Path(os.fspath(workdir))
        self.jsonl_path = os.fspath(root / "metrics.jsonl")
        self.samples_path = os.fspath(root / "samples.jsonl")
        self.tb_dir = os.fspath(root / "tensorboard")
        self._metrics, self._samples = _JsonlFile(self.jsonl_path), _JsonlFile(self.samples_path)
        self._tb = None
        if enabled:
            if start_step is not None:
                self._metrics.drop_after(start_step)
                self._samples.drop_after(start_step)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tb_dir, purge_step=None if start_step is None else start_step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._metrics.append([json.dumps({"step": step, "time": time.time(), **scalars}) + "\n"])
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def write_samples(self, step: int, rows: list[dict], tag: str, text: str) -> None:
        """One samples.jsonl row per sample ({"step", "time", **row}) and `text` (markdown) as TensorBoard text
        `tag` at `step`."""
        if not self.enabled:
            return
        now = time.time()
        self._samples.append([json.dumps({"step": step, "time": now, **r}) + "\n" for r in rows])
        self._tb.add_text(tag, text, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
