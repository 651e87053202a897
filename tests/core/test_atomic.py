"""core/atomic: the one temp-then-rename writer (every JSON, JSONL, report and cache file pal_jax writes)."""
import json
import os

import pytest

from pal_jax.core import atomic, preemption


def test_writes_whole_files(tmp_path):
    p = tmp_path / "a.json"
    assert atomic.write_json(p, {"x": [1, 2]}) == os.fspath(p)
    assert json.loads(p.read_text()) == {"x": [1, 2]}
    atomic.write_jsonl(tmp_path / "b.jsonl", [{"t": "é"}, {"t": 2}])
    assert (tmp_path / "b.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
    atomic.write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.jsonl", "c.bin"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "report.md"
    p.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(p, "new")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]


def test_a_killed_write_leaves_a_temporary_the_next_run_removes(tmp_path):
    target = tmp_path / "pairs.jsonl"
    tmp = atomic.temp_path(target)
    assert tmp.parent == tmp_path and tmp.name == f"pairs.jsonl.tmp-{os.getpid()}"
    left = tmp_path / "pairs.jsonl.tmp-999999"  # what a run killed between write and rename (another pid) leaves
    left.write_text("half")
    assert preemption.remove_orphans(tmp_path) == [os.fspath(left)] and not left.exists()
