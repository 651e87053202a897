"""Atomic file writes: the whole new content or the old file, never half of it (SIGTERM, a kill, a full disk).

Each writes `PATH.tmp-PID` beside the target and renames it over the target (an atomic replace on a local file
system; on an object store, e.g. gs://, the object appears whole when the copy completes). A run killed between the
two leaves only the temporary file, which the next run removes (core/preemption.remove_orphans)."""
from __future__ import annotations

import json
import os

from etils import epath


def temp_path(path) -> epath.Path:
    """Where the content of `path` is written before the rename (the suffix remove_orphans knows)."""
    p = epath.Path(os.fspath(path))
    return p.parent / f"{p.name}.tmp-{os.getpid()}"


def write_bytes(path, data: bytes) -> str:
    """`data` to `path` (a local path or an epath URL), whole or not at all. Returns the path."""
    tmp = temp_path(path)
    try:
        if "://" in os.fspath(path):  # an object store: the object appears whole once written
            tmp.write_bytes(data)
            tmp.replace(os.fspath(path))
        else:  # a local file: on disk (fsync) before the rename makes it the file
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
        raise
    return os.fspath(path)


def write_text(path, text: str, encoding: str = "utf-8") -> str:
    """`text` to `path`, whole or not at all. Returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_json(path, obj, indent: int | None = 2) -> str:
    """`obj` as JSON to `path`, whole or not at all."""
    return write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path, rows) -> str:
    """One JSON object a line (UTF-8, not ASCII-escaped) to `path`, whole or not at all."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
