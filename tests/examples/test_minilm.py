"""MiniLM example: matches sentence-transformers, clean ONNX export, held-out docstring sentences."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mpqc.data import sentences as text
from mpqc.examples import minilm as example
from mpqc.frontend.torch_export import export_module

SAMPLE = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to small integers.",
]


@pytest.fixture(scope="module")
def built():
    return example.build_module()


def embed(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[name]) for name in example.INPUT_NAMES)).numpy()


def test_interface_and_strict_weights(built):
    model, inputs = built
    assert example.NAME == "minilm"
    assert example.INPUT_NAMES == ("input_ids", "attention_mask")
    assert example.OUTPUT_NAMES == ("sentence_embedding",)
    assert not model.training
    assert [t.shape for t in inputs] == [(1, 128), (1, 128)]
    assert all(t.dtype == torch.int64 for t in inputs)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * 6  # q, k, v, attention output, intermediate, output per layer
    assert "layers.0.attention.query" in linears and "layers.5.output" in linears
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 6 and all(g.approximate == "none" for g in gelus)


def test_matches_sentence_transformers(built):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the reference implementation")
    model, _ = built
    texts = SAMPLE + text.sentences("eval", 3)
    ours = embed(model, example.tokenize(texts))
    reference = st.SentenceTransformer(str(example.model_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == reference.shape == (6, 384)
    assert np.abs(ours - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_length_does_not_change_embeddings(built):
    model, _ = built
    short_model, short_inputs = example.build_module(seq_len=32)
    assert short_inputs[0].shape == (1, 32)
    long = embed(model, example.tokenize(SAMPLE))
    short = embed(short_model, example.tokenize(SAMPLE, seq_len=32))
    assert np.abs(long - short).max() < 1e-5


def test_onnx_export_matches_torch(built, tmp_path):
    model, inputs = built
    path = tmp_path / "minilm.onnx"
    # mpqc's own frontend: dynamo exporter, opset 21, dynamic batch, layers named after modules.
    onnx.save(export_module(model, inputs, example.INPUT_NAMES, example.OUTPUT_NAMES), str(path))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(example.INPUT_NAMES)
    assert [o.name for o in graph.output] == list(example.OUTPUT_NAMES)
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input)  # symbolic batch

    feeds = example.proxy_feeds(6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, feeds)[0]
    torch_out = embed(model, feeds)
    assert onnx_out.shape == (6, 384)
    assert np.abs(onnx_out - torch_out).max() < 1e-4


def test_sentence_splits_are_disjoint_and_deterministic():
    assert not set(text.PROXY_MODULES) & set(text.EVAL_MODULES)
    proxy, held_out = text.sentences("proxy"), text.sentences("eval")
    assert len(proxy) == 128 and len(held_out) == 256
    assert len(set(proxy)) == len(proxy) and len(set(held_out)) == len(held_out)
    assert not set(proxy) & set(held_out)
    assert text.sentences("proxy", 10) == proxy[:10]
    for sentence in proxy + held_out:
        assert text.MIN_WORDS <= len(sentence.split()) <= text.MAX_WORDS
        assert sentence[0].isupper() and sentence[-1] in ".!?"

    feeds = example.proxy_feeds()
    assert set(feeds) == set(example.INPUT_NAMES)
    assert all(v.shape == (128, 128) and v.dtype == np.int64 for v in feeds.values())
    assert np.array_equal(example.proxy_feeds(4)["input_ids"], feeds["input_ids"][:4])
    eval_feeds, labels = example.eval_feeds()
    assert labels is None and eval_feeds["input_ids"].shape == (256, 128)
    # Every sentence fits: the last real token is [SEP] and nothing was truncated.
    lengths = eval_feeds["attention_mask"].sum(axis=1)
    assert lengths.max() < 128
    assert (eval_feeds["input_ids"][np.arange(256), lengths - 1] == 102).all()


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(64, 384))
    same = example.fidelity(reference, reference.copy(), None)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["neighbor_agreement"] == 1.0

    noisy = example.fidelity(reference, reference + rng.normal(scale=0.5, size=reference.shape), None)
    assert 0.5 < noisy["cosine_min"] <= noisy["cosine_mean"] < 1.0
    unrelated = example.fidelity(reference, rng.normal(size=reference.shape), None)
    assert abs(unrelated["cosine_mean"]) < 0.1 and unrelated["neighbor_agreement"] < 0.2
    with pytest.raises(ValueError):
        example.fidelity(reference, reference[:, :8], None)
