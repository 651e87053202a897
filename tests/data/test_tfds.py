"""TFDS builder (array_record) for ConvAI2, read back through tfds.data_source + Grain without TensorFlow."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import tarfile

import pytest

from helpers import tiny_config
from pal_jax import config as config_lib
from pal_jax.core.errors import ConfigError
from pal_jax.data import convai2, corpus, labels, synthetic, tfds_builder

TRAIN = (  # no candidates (a _no_cands file)
    "1 your persona: i like to ski.\n"
    "2 your persona: i have two dogs.\n"
    "3 hi , how are you ?\tgood , just back from skiing .\n"
    "4 do you have pets ?\tyes , two dogs .\n"
    "1 your persona: i am a chef.\n"
    "2 your persona: i live in paris.\n"
    "3 hello\thi there , i cook for a living .\n"
    "1 your persona: i play the violin.\n"
    "2 __SILENCE__\ti practice violin every day .\n"
    "3 cool , what music ?\tmostly bach .\n"
)
VALID = (  # candidates on some turns only, and a partner persona
    "1 your persona: i read twenty books a year.\n"
    "2 partner's persona: i am a nurse.\n"
    "3 what do you do for fun ?\ti read , about twenty books a year .\t\tno|i read , about twenty books a year .\n"
    "4 nice !\tthanks .\n"
    "1 your persona: i drive a red truck.\n"
    "2 any cars ?\tmy red truck .\t\ta|b|c|my red truck .\n"
)


def labelled(path, base_source=True):
    """read_convai2 of the file, labelled as the builder labels it, with source "<file name>:<line>"."""
    ds = convai2.read_convai2(path)
    labels.label_dialogues(ds, labels.get_labeler(tfds_builder.LABELER))
    return [dataclasses.replace(d, source=os.path.basename(d.source)) if base_source else d for d in ds]


def convai2_text(dialogues) -> str:
    """Dialogues in the ParlAI ConvAI2 text format."""
    lines = []
    for d in dialogues:
        rows = ([f"your persona: {p}" for p in d.persona] + [f"partner's persona: {p}" for p in d.partner_persona]
                + [f"{t.partner}\t{t.response}" + ("\t\t" + "|".join(t.candidates) if t.candidates else "")
                   for t in d.turns])
        lines += [f"{n} {r}" for n, r in enumerate(rows, start=1)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny manual_dir (train without candidates; valid with them, beside a _no_cands copy) built once."""
    root = tmp_path_factory.mktemp("tfds")
    manual = root / "manual"
    manual.mkdir()
    (manual / "train_self_original_no_cands.txt").write_text(TRAIN)
    (manual / "valid_self_original.txt").write_text(VALID)
    (manual / "valid_self_original_no_cands.txt").write_text(VALID.replace("\t\t", "\t\t\t"))  # never read
    (manual / "valid_both_original.txt").write_text(VALID)
    tfds_builder.build(root / "data", manual)
    return root


def test_no_tensorflow_in_this_environment():
    assert importlib.util.find_spec("tensorflow") is None  # the path below works without it
    with pytest.raises(ImportError):
        importlib.import_module("tensorflow")


def test_round_trip_equals_reader(built):
    manual, data = built / "manual", built / "data"
    files = tfds_builder.find_split_files(manual, "self_original")
    assert files == {"train": str(manual / "train_self_original_no_cands.txt"),
                     "validation": str(manual / "valid_self_original.txt")}  # with candidates preferred
    prepared = tfds_builder.prepared_builder(data)
    assert prepared.info.file_format.value == "array_record"
    assert dict(prepared.info.metadata) == {"labeler": "overlap"}
    assert {k: v.num_examples for k, v in prepared.info.splits.items()} == {"train": 3, "validation": 2}
    for split, path in files.items():
        back = tfds_builder.load_dialogues(data, split)
        assert back == labelled(path)
    valid = tfds_builder.load_dialogues(data, "validation")
    assert valid[0].partner_persona == ["i am a nurse."]
    assert [t.candidates for t in valid[0].turns] == [["no", "i read , about twenty books a year ."], None]
    assert valid[1].turns[0].persona_label == 0 and valid[1].source == "valid_self_original.txt:5"
    train = tfds_builder.load_dialogues(data, "train")
    assert all(t.candidates is None for d in train for t in d.turns)
    assert "tensorflow" not in sys.modules


def test_data_source_and_grain_random_access(built):
    data = built / "data"
    src = tfds_builder.data_source(data, "train")
    assert type(src).__name__ == "ArrayRecordDataSource" and len(src) == 3
    ex = src[2]
    assert ex["dialogue_id"] == 2 and list(ex["turns"]["num_candidates"]) == [0, 0]
    ds = tfds_builder.grain_dataset(data, "train")
    assert len(ds) == 3 and ds[1] == labelled(built / "manual" / "train_self_original_no_cands.txt")[1]
    assert [d.dialogue_id for d in tfds_builder.load_dialogues(data, "train[1:]")] == [1, 2]
    both = tfds_builder.load_dialogues(data, "train+validation")  # ids restart per file: renumbered
    assert [d.dialogue_id for d in both] == [0, 1, 2, 3, 4] and both[3].partner_persona == ["i am a nurse."]


def test_other_labeler_relabels(built):
    back = tfds_builder.load_dialogues(built / "data", "validation", labeler="overlap:3")
    ref = convai2.read_convai2(built / "manual" / "valid_self_original.txt")
    labels.label_dialogues(ref, labels.get_labeler("overlap:3"))
    assert [t.persona_label for d in back for t in d.turns] == [t.persona_label for d in ref for t in d.turns]


def test_other_config_and_archive(tmp_path, built):
    b = tfds_builder.build(tmp_path / "both", built / "manual", config="both_original")
    assert list(b.info.splits) == ["validation"]
    assert tfds_builder.load_dialogues(tmp_path / "both", "validation", config="both_original") == labelled(
        built / "manual" / "valid_both_original.txt")
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / tfds_builder.ARCHIVE, "w:gz") as tar:
        tar.add(built / "manual" / "train_self_original_no_cands.txt", arcname="train_self_original_no_cands.txt")
    tfds_builder.build(tmp_path / "from_tgz", archive_dir)
    assert tfds_builder.load_dialogues(tmp_path / "from_tgz", "train") == labelled(
        built / "manual" / "train_self_original_no_cands.txt")


def test_errors_say_what_is_expected(tmp_path, built):
    empty = tmp_path / "m"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"train_self_revised\[_no_cands\]\.txt.*convai2_fix_723"):
        tfds_builder.build(tmp_path / "d", empty, config="self_revised")
    with pytest.raises(FileNotFoundError, match="no built convai2_persona/self_original dataset"):
        tfds_builder.load_dialogues(tmp_path / "nothing", "train")
    with pytest.raises(ValueError, match=r"TFDS split 'test' not in .*\['train', 'validation'\]"):
        tfds_builder.load_dialogues(built / "data", "test")
    assert config_lib.TFDS_CONFIGS == tfds_builder.VARIANTS
    with pytest.raises(ConfigError, match="config.data.path = ''.*TFDS data_dir"):
        config_lib.validate(tiny_config(data__source="tfds"))
    with pytest.raises(ConfigError, match="config.data.tfds_config = 'self'"):
        config_lib.validate(tiny_config(data__source="tfds", data__path="x", data__tfds_config="self"))


def test_real_convai2_validation(tmp_path, convai2_dir):
    manual = tmp_path / "manual"
    manual.mkdir()
    os.symlink(convai2_dir / "valid_self_original.txt", manual / "valid_self_original.txt")  # no copy
    tfds_builder.build(tmp_path / "data", manual)
    back = tfds_builder.load_dialogues(tmp_path / "data", "validation")
    assert len(back) == 1000 and sum(len(d.turns) for d in back) == 7801
    assert all(len(t.candidates) == 20 and t.candidates[-1] == t.response for d in back for t in d.turns)
    assert back == labelled(manual / "valid_self_original.txt")


def test_stage1_trains_from_tfds(tmp_path):
    from pal_jax.training import stage1
    manual = tmp_path / "manual"
    manual.mkdir()
    path = manual / "train_self_original_no_cands.txt"
    path.write_text(convai2_text(synthetic.generate_corpus(60, 1234)))
    tfds_builder.build(tmp_path / "data", manual)
    c = tiny_config(data__source="tfds", data__path=str(tmp_path / "data"), train__steps=2, train__eval_every=2,
                    train__checkpoint_every=2, train__log_every=1)
    config_lib.validate(c)
    # the same Dialogue lists, hence the same seeded split and batch order, as data.source=convai2 on the file
    via_tfds = corpus.load_corpus(c.data)
    plain = corpus.load_corpus(tiny_config(data__source="convai2", data__path=str(path)).data)
    for k in corpus.SPLITS:
        assert via_tfds[k] == [dataclasses.replace(d, source=os.path.basename(d.source)) for d in plain[k]]
    summary = stage1.run(c, str(tmp_path / "w"))
    assert summary["step"] == 2 and not summary["preempted"]
    assert summary["dev"]["loss"] == pytest.approx(summary["dev"]["loss"])  # finite
