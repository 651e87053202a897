"""configs/pipeline.py:smollm2_convai2 (the real run, docs/real_run.md): its settings, its data check, its split."""
from __future__ import annotations

import os

import pytest

from conftest import REPO
from pal_jax.core.errors import ConfigError
from pal_jax.config import validate


def pipeline_config(preset):
    from configs import pipeline
    return pipeline, pipeline.get_config(preset)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the default data path is relative to the repository root


def test_preset_starts_from_smollm2_on_convai2(in_repo, convai2_dir):
    mod, c = pipeline_config("smollm2_convai2")
    assert (c.preset, c.init_from, c.data.source) == ("smollm2_135m", "smollm2_gguf", "convai2")
    assert c.data.path == mod.CONVAI2_DEFAULT and os.path.samefile(c.data.path,
                                                                   convai2_dir / "valid_self_original.txt")
    for key, value in mod.SMOLLM2_CONVAI2_CPU.items():
        section, name = key.split(".")
        assert c[section][name] == value, key
    assert c.predict.prompt_format == "auto" and c.eval.sentence_encoder == "default"
    validate(c)
    full = pipeline_config("smollm2_convai2_full")[1]
    validate(full)
    assert full.data.max_len == 512 and full.predict.max_records == 0 and full.init_from == "smollm2_gguf"
    assert pipeline_config("tiny")[1].data.source == "synthetic"  # the other presets are unchanged


def test_missing_data_stops_before_any_work_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/data/... does not exist from here
    _, c = pipeline_config("smollm2_convai2")
    with pytest.raises(ConfigError, match=r"config.data.path = '\.\./shared/data/convai2/valid_self_original.txt': "
                                          r"expected an existing ConvAI2 text file.*not part of the repository"):
        validate(c)
    c.mode = "chat"  # chat (and predict/evaluate with predict.input) do not read the corpus
    c.predict.persona_file = "p.txt"
    validate(c)


def test_split_by_dialogue_with_an_untouched_test_part(in_repo, convai2_dir):
    """The sizes docs/real_run.md states, and no dialogue shared between the parts."""
    from pal_jax.data import corpus
    _, c = pipeline_config("smollm2_convai2")
    parts = corpus.load_corpus(c.data)
    assert [len(parts[k]) for k in ("train", "dev", "test")] == [800, 100, 100]
    assert [sum(len(d.turns) for d in parts[k]) for k in ("train", "dev", "test")] == [6248, 779, 774]
    ids = {k: {d.dialogue_id for d in parts[k]} for k in parts}
    assert not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"]) and not (ids["train"] & ids["dev"])
    test = [t for d in parts["test"] for t in d.turns]
    assert all(len(t.candidates) == 20 and t.candidates[-1] == t.response for t in test)  # Hits@1 over 20
    # the evaluated turns are whole test dialogues
    n, cum = c.predict.max_records, 0
    for d in parts["test"]:
        cum += len(d.turns)
        if cum >= n:
            break
    assert cum == n
