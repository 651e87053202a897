"""Samples while training (pal_jax/training/samples.py): Select then Generate on fixed dev turns at every evaluation, in the
log, TensorBoard (text) and WORKDIR/samples.jsonl, trimmed on resume like metrics.jsonl."""
from __future__ import annotations

import json
import logging
import shutil
import struct

import pytest

from helpers import tiny_config
from pal_jax.training import samples
from pal_jax.inference import decode as sampling
from pal_jax.inference import scoring
from pal_jax.training import stage1
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate
from pal_jax.data import convai2, corpus


def tb_texts(tb_dir) -> list[tuple[int, str, str]]:
    """(step, tag, text) of every text summary in the TensorBoard event files under tb_dir (read without TF)."""
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("tensor") and v.tensor.string_val:
                    out.append((ev.step, v.tag, v.tensor.string_val[0].decode()))
    return out


def _rows(workdir) -> list[dict]:
    path = workdir / "samples.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_turns_are_a_fixed_seeded_choice_in_split_order():
    c = tiny_config(data__synthetic_dialogues=30)
    records = convai2.records_from_dialogues(corpus.load_corpus(c.data)["dev"])
    a, b = samples.pick_turns(records, 4, 0), samples.pick_turns(records, 4, 0)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == 4
    order = [r.id for r in records]
    assert [order.index(r.id) for r in a] == sorted(order.index(r.id) for r in a)
    assert samples.pick_turns(records[:2], 4, 0) == records[:2]
    assert samples.sample_select_rule("calibrated") == "marginal" and samples.sample_select_rule("sum") == "sum"
    validate(tiny_config(train__sample_turns=0))
    with pytest.raises(ConfigError, match="config.train.sample_turns"):
        validate(tiny_config(train__sample_turns=-1))


def test_samples_at_every_eval_compiled_once_and_trimmed_on_resume(tmp_path, monkeypatch, caplog):
    """Stage 1, 6 steps, evaluations at 3 and 6: 3 turns each in samples.jsonl, TensorBoard text and the log; the
    scorer and the decoder compile at the first evaluation only. Then the run is cut back to its step-3 checkpoint
    with a row cut short by a kill: the rerun drops the rows after step 3 and writes step 6 again."""
    c = tiny_config(train__steps=6, train__eval_every=3, train__checkpoint_every=3, train__sample_turns=3,
                    data__synthetic_dialogues=30, predict__max_new_tokens=6)
    w = tmp_path / "w"
    caches = []
    real_call = samples.Sampler.__call__

    def spy(self, step, params, frozen=None):
        rows = real_call(self, step, params, frozen)
        caches.append((scoring.candidate_token_logprobs_jit._cache_size(), sampling.generate_jit._cache_size()))
        return rows

    monkeypatch.setattr(samples.Sampler, "__call__", spy)
    with caplog.at_level(logging.INFO):
        summary = stage1.run(c, str(w))
    rows = _rows(w)
    assert [r["step"] for r in rows] == [3, 3, 3, 6, 6, 6] and summary["samples"] == str(w / "samples.jsonl")
    assert [r["id"] for r in rows[:3]] == [r["id"] for r in rows[3:]]  # the same turns every time
    for r in rows:
        assert (r["selected"] == -1) == (r["persona"] == samples.NONE)
        assert isinstance(r["reply"], str) and r["gold_reply"] and "user" in r and "gold_persona" in r
    assert caches[0] == caches[1], caches  # nothing compiled at the second evaluation
    lines = [m for m in caplog.messages if " sample " in m]
    assert len(lines) == 6 and all("persona: " in x and "| reply: " in x and "| gold: " in x for x in lines)
    texts = [(s, tag) for s, tag, _ in tb_texts(w / "tensorboard")]
    assert [s for s, _ in texts] == [3, 6] and all(tag.startswith("dev/samples") for _, tag in texts), texts
    table = tb_texts(w / "tensorboard")[0][2]
    assert table.count("\n") == 2 + 3 and rows[0]["gold_reply"].split()[0] in table

    # resume from step 3: the samples written after it go (and the row cut short), step 6 comes again
    shutil.rmtree(w / "checkpoints" / "6")
    with open(w / "samples.jsonl", "a") as f:
        f.write('{"step": 7, "rep')
    stage1.run(c, str(w))
    again = _rows(w)
    assert [r["step"] for r in again] == [3, 3, 3, 6, 6, 6]
    assert again[:3] == rows[:3]
    assert [(r["persona"], r["reply"]) for r in again[3:]] == [(r["persona"], r["reply"]) for r in rows[3:]]


def test_sample_turns_zero_writes_nothing(tmp_path):
    w = tmp_path / "w"
    summary = stage1.run(tiny_config(train__steps=3, train__eval_every=3, train__sample_turns=0,
                                     data__synthetic_dialogues=30), str(w))
    assert not (w / "samples.jsonl").exists() and "samples" not in summary
    assert tb_texts(w / "tensorboard") == []


@pytest.mark.slow  # a LoRA variant of a path the default suite covers without LoRA; `pytest -m slow`
def test_lora_stage1_on_a_data_fsdp_tensor_mesh_samples_from_base_and_adapters(tmp_path):
    """With LoRA the train step holds only the adapters: the sampler decodes from the frozen base + adapters, here
    with the params sharded over fsdp and tensor (2 x 2 x 2 mesh: the predictor's batch is rounded up to 4)."""
    w = tmp_path / "w"
    stage1.run(tiny_config(train__steps=3, train__eval_every=3, train__sample_turns=2, data__synthetic_dialogues=30,
                           predict__max_new_tokens=4, lora__rank=4, lora__alpha=8.0, mesh__data=2, mesh__fsdp=2,
                           mesh__tensor=2), str(w))
    assert [r["step"] for r in _rows(w)] == [3, 3]
