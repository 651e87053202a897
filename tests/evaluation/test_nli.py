"""pal_jax.evaluation.nli vs PyTorch transformers on tiny random BERT / RoBERTa sequence classifiers; the C-score forms on a
stub NLI model (that test needs no torch)."""
import json
import os

import numpy as np
import pytest

from pal_jax.evaluation import metrics
from pal_jax.evaluation import nli

try:
    import tokenizers
    import torch
    import transformers
except ImportError:
    tokenizers = torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch, transformers, tokenizers (requirements-test.txt)")

ID2LABEL = {0: "contradiction", 1: "neutral", 2: "entailment"}
WORDS = ("i like my dog cat red blue car have love hate am a teacher student live in city farm do not "
         "the play guitar piano eat meat vegan").split()


def _save(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
                  initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(max_position_embeddings=300, pad_token_id=0, **common))
    else:
        model = transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(max_position_embeddings=300, pad_token_id=1, type_vocab_size=1, **common))
    model.eval()
    d = str(tmp_path / kind)
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def _batch(pad_id, rows=((5, 7, 9, 11, 3), (5, 8, 3), (5, 20, 30, 40, 50, 60, 70, 3))):
    T = max(map(len, rows))
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    types = np.zeros_like(ids)
    types[0, 3:5] = 1  # a second segment in the BERT row
    return ids, mask, types


@needs_torch
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_logits_match_torch(tmp_path, kind):
    model, d = _save(tmp_path, kind)
    from safetensors.numpy import load_file

    with open(os.path.join(d, "config.json")) as f:
        cfg = nli.NLIConfig.from_json(json.load(f))
    params = nli.load_params(load_file(os.path.join(d, "model.safetensors")), cfg)
    ids, mask, types = _batch(cfg.pad_id)
    if kind == "roberta":
        types[:] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).logits.numpy()
    got = np.asarray(nli.forward(params, ids.astype(np.int32), mask.astype(np.int32), types.astype(np.int32), cfg=cfg))
    diff = float(np.abs(got - ref).max())
    print(f"{kind}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4, diff
    assert np.abs(ref).max() > 1e-2  # non-trivial logits


@needs_torch
def test_errors(tmp_path):
    _, d = _save(tmp_path, "bert")
    from safetensors.numpy import load_file

    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="gpt2"):
        nli.NLIConfig.from_json({**raw, "model_type": "gpt2"})
    tensors = load_file(os.path.join(d, "model.safetensors"))
    del tensors["bert.pooler.dense.weight"]
    with pytest.raises(ValueError, match="bert.pooler.dense.weight"):
        nli.load_params(tensors, nli.NLIConfig.from_json(raw))
    with pytest.raises(ValueError, match="foo"):
        nli._label_values({"0": "foo", "1": "neutral", "2": "entailment"})


def _write_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(d, "tokenizer.json"))
    return tok


@needs_torch
def test_predict_and_c_score(tmp_path):
    model, d = _save(tmp_path, "bert")
    tok = _write_tokenizer(d)
    rng = np.random.default_rng(0)

    def sent():
        return " ".join(rng.choice(WORDS, size=rng.integers(2, 12)))

    responses = [sent() for _ in range(7)]
    personas = [[sent() for _ in range(rng.integers(1, 5))] for _ in responses]
    prem = [r for r, ps in zip(responses, personas) for _ in ps]
    hyp = [p for ps in personas for p in ps]

    def torch_logits():  # unpadded, one pair at a time
        out = []
        for p, h in zip(prem, hyp):
            e = tok.encode(p, h)
            with torch.no_grad():
                out.append(model(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids])).logits[0])
        return torch.stack(out)

    with torch.no_grad():  # centre the classes over these pairs so the random model predicts all three labels
        model.classifier.bias -= torch_logits().mean(0)
    model.save_pretrained(d, safe_serialization=True)
    value = {"entailment": 1, "neutral": 0, "contradiction": -1}
    expected = [value[ID2LABEL[int(i)]] for i in torch_logits().argmax(-1)]

    m = nli.NLIModel.from_dir(d)
    got = m.predict(prem, hyp, batch_size=4)  # several batches incl. a ragged last one
    assert got == expected
    assert len(set(expected)) > 1, expected  # the random model should not be constant

    rows, k = [], 0
    for ps in personas:
        rows.append(expected[k:k + len(ps)])
        k += len(ps)
    assert nli.c_score_nli(m, responses, personas, batch_size=4) == pytest.approx(metrics.c_score(rows))

    # PAL's direction on the real model: premise = persona sentence, hypothesis = response
    prem, hyp = hyp, prem
    expected_pal = [value[ID2LABEL[int(i)]] for i in torch_logits().argmax(-1)]
    pal_rows, k = [], 0
    for ps in personas:
        pal_rows.append(expected_pal[k:k + len(ps)])
        k += len(ps)
    got = nli.c_scores_nli(m, responses, personas, batch_size=4)
    np.testing.assert_array_equal(got["c_score_rows"], [sum(r) for r in rows])
    np.testing.assert_array_equal(got["c_score_max_rows"], [max(r) for r in pal_rows])
    assert got["c_score"] == pytest.approx(metrics.c_score(rows))
    assert got["c_score_max"] == pytest.approx(metrics.c_score_max(pal_rows))


# A toy NLI model that looks each (premise, hypothesis) pair up in a table holding both directions with different
# labels, so a swapped direction, or a response paired with another response's persona, changes the result or
# raises KeyError.
R0, R1 = "i love my dog max", "i hate dogs"
PERSONAS = [["i have a dog", "my dog is max", "i am a teacher"], ["i love dogs", "i live on a farm"]]
TABLE = {
    # Madotto direction: premise = response, hypothesis = persona sentence
    (R0, "i have a dog"): 1, (R0, "my dog is max"): 1, (R0, "i am a teacher"): 0,
    (R1, "i love dogs"): -1, (R1, "i live on a farm"): 0,
    # PAL direction: premise = persona sentence, hypothesis = response
    ("i have a dog", R0): 0, ("my dog is max", R0): 1, ("i am a teacher", R0): -1,
    ("i love dogs", R1): -1, ("i live on a farm", R1): -1,
}


class StubNLI:
    def __init__(self):
        self.calls = []

    def predict(self, premises, hypotheses, batch_size=32):
        self.calls.append((len(premises), batch_size))
        return [TABLE[(p, h)] for p, h in zip(premises, hypotheses)]


def test_c_scores_nli_directions_on_stub():
    stub = StubNLI()
    got = nli.c_scores_nli(stub, [R0, R1], PERSONAS, batch_size=2)
    # Madotto rows: R0 [1, 1, 0] -> sum 2; R1 [-1, 0] -> sum -1; mean (2 - 1) / 2 = 0.5
    # (with the PAL labels instead: sums 0 and -2 -> -1)
    assert got["c_score_rows"] == [2.0, -1.0]
    assert got["c_score"] == pytest.approx(0.5)
    # PAL rows: R0 [0, 1, -1] -> max 1; R1 [-1, -1] -> max -1; mean 0
    # (with the Madotto labels instead: maxes 1 and 0 -> 0.5)
    assert got["c_score_max_rows"] == [1.0, -1.0]
    assert got["c_score_max"] == pytest.approx(0.0)
    assert set(got) == {"c_score", "c_score_max", "c_score_rows", "c_score_max_rows"}
    assert all(isinstance(v, float) for v in got["c_score_rows"] + got["c_score_max_rows"])
    assert stub.calls == [(5, 2), (5, 2)]  # one batched pass per direction over all 5 (response, sentence) pairs

    stub = StubNLI()
    assert nli.c_score_nli(stub, [R0, R1], PERSONAS) == pytest.approx(0.5)
    assert stub.calls == [(5, 32)]  # Madotto's form alone: one pass

    # a response with no persona sentences: sum 0, max 0, and no pair sent to the model for it
    stub = StubNLI()
    got = nli.c_scores_nli(stub, [R0, R1], [PERSONAS[0], []])
    assert got["c_score_rows"] == [2.0, 0.0] and got["c_score_max_rows"] == [1.0, 0.0]
    assert stub.calls == [(3, 32), (3, 32)]

    with pytest.raises(ValueError, match="2 responses vs 1 personas"):
        nli.c_scores_nli(StubNLI(), [R0, R1], PERSONAS[:1])
    with pytest.raises(TypeError, match="personas\\[0\\] is a str"):
        nli.c_scores_nli(StubNLI(), [R0], ["i have a dog"])
    with pytest.raises(ValueError, match="0 responses"):
        nli.c_scores_nli(StubNLI(), [], [])
