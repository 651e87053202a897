"""PersonaChat / ConvAI2 as a TFDS dataset (array_record), read back by random access through Grain.

The builder reads the official ParlAI ConvAI2 release files from `manual_dir` with the project's own reader
(`convai2.read_convai2`), labels every turn with the persona labeler (`labels.get_labeler(LABELER)`: the files
carry no labels) and writes one example per dialogue in the `array_record` format, so it can be read with
`tfds.data_source` (random access) and `grain.MapDataset` without TensorFlow installed.

Build (once; `manual_dir` holds `convai2_fix_723.tgz` or the `*.txt` files extracted from it):

    from pal_jax.data import tfds_builder
    tfds_builder.build(data_dir="/data/tfds", manual_dir="/data/convai2")   # config "self_original"

Read back:

    dialogues = tfds_builder.load_dialogues("/data/tfds", split="validation")   # list[convai2.Dialogue]

Train from it: `--config.data.source=tfds --config.data.path=/data/tfds --config.data.tfds_split=validation`
(`corpus.load_corpus` calls `load_dialogues`). The dialogues come back in file order with the reader's dialogue
ids, so `corpus.split_dialogues` draws the same seeded train/dev/test split as `data.source=convai2` on the same
file, and the Stage 1 batch order, a pure function of (seed, step) over that Dialogue list
(`pipeline.BatchSource`), stays deterministic and resumable.

Configs (the ParlAI variants): self_original (default), self_revised, both_original, both_revised ("both" files
also carry the partner's persona). Splits: whichever of `train_<variant>[_no_cands].txt` and
`valid_<variant>[_no_cands].txt` are present, named "train" and "validation"; where both the file with candidates
and the `_no_cands` one are present, the one with candidates is read (same dialogues, plus the 20 candidates).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pal_jax.data import convai2, labels

LABELER = "overlap"  # the labeler that fills persona_label at build time (recorded in the dataset's metadata)
ARCHIVE = "convai2_fix_723.tgz"
DOWNLOAD_URL = "http://parl.ai/downloads/convai2/convai2_fix_723.tgz"
SPLIT_FILES = (("train", "train"), ("validation", "valid"))  # TFDS split name, ParlAI file prefix
VARIANTS = convai2.TFDS_VARIANTS

_CITATION = """\
@article{zhang2018personalizing,
  title={Personalizing Dialogue Agents: I have a dog, do you have pets too?},
  author={Zhang, Saizheng and Dinan, Emily and Urbanek, Jack and Szlam, Arthur and Kiela, Douwe and Weston, Jason},
  journal={arXiv preprint arXiv:1801.07243},
  year={2018}
}
@article{dinan2019second,
  title={The Second Conversational Intelligence Challenge (ConvAI2)},
  author={Dinan, Emily and Logacheva, Varvara and Malykh, Valentin and others},
  journal={arXiv preprint arXiv:1902.00098},
  year={2019}
}
"""


class Convai2Persona(tfds.core.GeneratorBasedBuilder):
    """PersonaChat / ConvAI2 (ParlAI release): one example per dialogue, turns labelled with a persona index."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ParlAI convai2_fix_723 text files, persona labels from the overlap labeler."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=v, description=f"ParlAI ConvAI2 {v.replace('_', ' ')} files"
                                + (" (with the partner's persona)" if v.startswith("both") else ""))
        for v in VARIANTS
    ]
    DEFAULT_CONFIG_NAME = "self_original"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download ParlAI's ConvAI2 data, {DOWNLOAD_URL} (CC BY 4.0), and place in manual_dir either the archive itself
({ARCHIVE}) or the text files extracted from it, e.g. train_self_original.txt and valid_self_original.txt (the
`_no_cands` files work too). Every split whose file is present is built: train_<config>*.txt -> "train",
valid_<config>*.txt -> "validation", where <config> is self_original, self_revised, both_original or both_revised.
"""

    # tensorflow-datasets 4.9.10's code_path reaches for `importlib_resources`, a dependency it declares only for
    # Python < 3.9, when the builder lives in a package (tensorflow/datasets#11212). The path only locates a
    # checksums file beside the module, and this builder downloads nothing: give it directly.
    code_path = epath.Path(__file__)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # random access without TensorFlow
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="PersonaChat dialogues from the ConvAI2 challenge (ParlAI release), one example per "
                        "dialogue: own persona sentences, the partner's persona (both_* configs), and the turns "
                        "(partner utterance, gold response, the 20 ranking candidates when the file has them, "
                        f"persona_label: index of the persona sentence the response uses or -1, from the "
                        f"'{LABELER}' labeler of pal_jax.data.labels).",
            features=tfds.features.FeaturesDict({
                "dialogue_id": np.int64,  # index of the dialogue in its file (convai2.read_convai2)
                "source": text,  # "<file name>:<line>" where the dialogue starts
                "persona": tfds.features.Sequence(text),
                "partner_persona": tfds.features.Sequence(text),
                "turns": tfds.features.Sequence({
                    "partner": text,
                    "response": text,
                    "num_candidates": np.int32,  # 0: the file has no candidates
                    "persona_label": np.int32,  # index into persona, or -1
                }),
                # Every turn's candidates, concatenated in turn order (turns/num_candidates splits them): a
                # sequence inside the turns sequence would be ragged, which TFDS serialises only with TensorFlow.
                "candidates": tfds.features.Sequence(text),
            }),
            homepage="https://parl.ai/projects/convai2/",
            citation=_CITATION,
            license="CC BY 4.0",
            disable_shuffling=True,  # keep file order: the corpus split and batch order then match source=convai2
            metadata=tfds.core.MetadataDict(labeler=LABELER),
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        if (root / ARCHIVE).exists():  # dl_manager.extract needs TensorFlow (tf.io.gfile): untar it here
            root = extract_archive(root / ARCHIVE, os.path.join(os.fspath(dl_manager.download_dir), "convai2"))
        files = find_split_files(root, self.builder_config.name)
        if not files:
            raise FileNotFoundError(
                f"{dl_manager.manual_dir}: no ConvAI2 file for config {self.builder_config.name!r}; expected "
                f"train_{self.builder_config.name}[_no_cands].txt and/or valid_{self.builder_config.name}"
                f"[_no_cands].txt (or {ARCHIVE}) there.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path):
        dialogues = convai2.read_convai2(path)
        labels.label_dialogues(dialogues, labels.get_labeler(LABELER))
        for d in dialogues:
            yield d.dialogue_id, dialogue_to_example(d)


def extract_archive(archive, dest) -> str:
    """Untar the ConvAI2 release's .txt files into dest (kept: a rebuild reuses them); returns dest."""
    done = os.path.join(dest, ".extracted")
    if not os.path.exists(done):
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(os.fspath(archive)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")]
            tar.extractall(dest, members=members, filter="data")
        open(done, "w").close()
    return dest


def find_split_files(root, variant: str) -> dict[str, str]:
    """{TFDS split: path} for the ConvAI2 files of `variant` under root (or one folder down, as an extracted
    archive may nest them); the file with candidates is preferred over the `_no_cands` one."""
    root = os.fspath(root)
    dirs = [root] + sorted(os.path.join(root, x) for x in os.listdir(root) if os.path.isdir(os.path.join(root, x)))
    out = {}
    for split, prefix in SPLIT_FILES:
        for d in dirs:
            for name in (f"{prefix}_{variant}.txt", f"{prefix}_{variant}_no_cands.txt"):
                if split not in out and os.path.isfile(os.path.join(d, name)):
                    out[split] = os.path.join(d, name)
    return out


def dialogue_to_example(d: convai2.Dialogue) -> dict:
    """A labelled Dialogue as a TFDS example (persona_label must be set: -1 or an index)."""
    path, _, line = d.source.rpartition(":")
    return {
        "dialogue_id": d.dialogue_id,
        "source": f"{os.path.basename(path)}:{line}",
        "persona": list(d.persona),
        "partner_persona": list(d.partner_persona),
        "turns": {
            "partner": [t.partner for t in d.turns],
            "response": [t.response for t in d.turns],
            "num_candidates": [len(t.candidates or ()) for t in d.turns],
            "persona_label": [t.persona_label for t in d.turns],
        },
        "candidates": [c for t in d.turns for c in t.candidates or ()],
    }


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _texts(xs) -> list[str]:
    return [_text(x) for x in xs]


def example_to_dialogue(ex) -> convai2.Dialogue:
    """A decoded TFDS example (numpy: bytes strings, int arrays) back into the project's Dialogue."""
    t = ex["turns"]
    cands = _texts(ex["candidates"])
    ends = np.cumsum(t["num_candidates"])
    if len(cands) != (ends[-1] if len(ends) else 0):
        raise ValueError(f"{_text(ex['source'])}: {len(cands)} candidates for turns/num_candidates summing to "
                         f"{ends[-1] if len(ends) else 0}; expected them equal (a corrupt example)")
    turns = [convai2.Turn(partner=_text(p), response=_text(r), candidates=cands[e - n:e] or None,
                          persona_label=int(k))
             for p, r, n, e, k in zip(t["partner"], t["response"], t["num_candidates"], ends, t["persona_label"])]
    return convai2.Dialogue(persona=_texts(ex["persona"]), partner_persona=_texts(ex["partner_persona"]),
                            turns=turns, source=_text(ex["source"]), dialogue_id=int(ex["dialogue_id"]))


def build(data_dir, manual_dir, config: str = "self_original") -> Convai2Persona:
    """Build (download_and_prepare from manual_dir) the dataset into data_dir; a built one is reused."""
    builder = Convai2Persona(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


def prepared_builder(data_dir, config: str = "self_original") -> Convai2Persona:
    """The builder over an already built dataset in data_dir (a clear error where there is none)."""
    builder = Convai2Persona(data_dir=os.fspath(data_dir), config=config)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{data_dir}: no built {builder.name}/{config} dataset (looked for {builder.data_dir}); expected a TFDS "
            f"data_dir built with pal_jax.data.tfds_builder.build(data_dir, manual_dir, config={config!r})")
    return builder


def data_source(data_dir, split: str, config: str = "self_original"):
    """The built split as a random-access source (`tfds.data_source` over array_record; no TensorFlow needed).
    `split` is a TFDS split string: "train", "validation", "validation[:100]", "train+validation"."""
    builder = prepared_builder(data_dir, config)
    available = sorted(builder.info.splits)
    if not split or any(s.split("[")[0] not in available for s in split.split("+")):
        raise ValueError(f"TFDS split {split!r} not in {builder.data_dir} (splits there: {available}); expected "
                         f"one of them (config.data.tfds_split)")
    return tfds.data_source(f"{builder.name}/{config}", split=split, data_dir=os.fspath(data_dir), download=False)


def grain_dataset(data_dir, split: str, config: str = "self_original"):
    """A `grain.MapDataset` of Dialogues over the built split (random access: `ds[i]`, `len(ds)`)."""
    import grain
    return grain.MapDataset.source(data_source(data_dir, split, config)).map(example_to_dialogue)


def load_dialogues(data_dir, split: str, config: str = "self_original", labeler: str | None = None
                   ) -> list[convai2.Dialogue]:
    """The built split's Dialogues in file order, through Grain: equal to convai2.read_convai2 of the file
    labelled with LABELER, except source = "<file name>:<line>". For a split string spanning files
    ("train+validation") the dialogue ids are renumbered by position. With a `labeler` other than the one the
    dataset was built with (its metadata), the turns are relabelled with it."""
    ds = grain_dataset(data_dir, split, config)
    dialogues = [ds[i] for i in range(len(ds))]
    ids = [d.dialogue_id for d in dialogues]
    if len(set(ids)) != len(ids):  # ids restart in each file
        dialogues = [dataclasses.replace(d, dialogue_id=i) for i, d in enumerate(dialogues)]
    built_with = prepared_builder(data_dir, config).info.metadata.get("labeler", LABELER)
    if labeler is not None and labeler != built_with:
        for d in dialogues:
            for t in d.turns:
                t.persona_label = None
        labels.label_dialogues(dialogues, labels.get_labeler(labeler))
        logging.info("tfds: relabelled %s with %r (the dataset was built with %r)", split, labeler, built_with)
    return dialogues
