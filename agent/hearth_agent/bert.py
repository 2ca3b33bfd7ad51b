"""The worker's fast path for plain BERT sentence encoders (e.g. all-MiniLM-L6-v2): a small pure-torch
BERT, its weights straight from model.safetensors and the Rust `tokenizers` package, so a cold worker
never imports transformers or sentence-transformers (~9 s of imports on a small CPU between them).

It computes what sentence-transformers computes for a Transformer → Pooling → (Normalize) pipeline:
the same tokenization (tokenizer.json, truncated to sentence_bert_config's max_seq_length), the same
length-sorted batches padded per batch, the same encoder (exact erf GELU, post-LayerNorm) and the same
pooling. Anything else about a model — another architecture, module, pooling mode, dtype, a prompt or a
tokenizer_config that would change the tokenizer — and `fast_path_refusal` names why, and the worker
uses sentence-transformers instead. The encoder may run in bfloat16 or float16 (the host's choice,
$HEARTH_WORKER_DTYPE): slightly different vectors, still float32 on the way out.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

MODULE_TRANSFORMER = "sentence_transformers.models.Transformer"
MODULE_POOLING = "sentence_transformers.models.Pooling"
MODULE_NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
}
# Prefixes a BERT checkpoint's names may carry (a BertFor* model; a whole sentence-transformers model).
WEIGHT_PREFIXES = ("bert.", "0.auto_model.")
# Saved with a BertModel but unused by sentence embeddings: the pooler (sentence-transformers pools
# itself), pretraining heads, and the index buffers that are rebuilt here.
IGNORED_WEIGHTS = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")
# sentence-transformers' SentenceTransformer.encode default, which the worker uses.
BATCH_SIZE = 32


class BertWeightsError(ValueError):
    """model.safetensors does not hold exactly the weights the model's config.json describes."""


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def fast_path_refusal(model_dir: str | Path) -> str | None:
    """None when this model can run on the fast path; otherwise why not (the worker then falls back to
    sentence-transformers). Reads only small files and the safetensors header."""
    root = Path(model_dir)
    try:
        modules = _read_json(root / "modules.json")
        config = _read_json(root / "config.json")
        st_config = _read_json(root / "sentence_bert_config.json")
        types = [str(module.get("type")) for module in modules]
        if types not in (
            [MODULE_TRANSFORMER, MODULE_POOLING],
            [MODULE_TRANSFORMER, MODULE_POOLING, MODULE_NORMALIZE],
        ):
            return f"modules.json is not Transformer → Pooling (→ Normalize): {types}"
        if modules[0].get("path", "") not in ("", "."):
            return "the Transformer module is not at the model's root"
        if config.get("architectures") != ["BertModel"] and config.get("model_type") != "bert":
            return f"not a BERT model: {config.get('architectures')} / {config.get('model_type')}"
        if config.get("hidden_act", "gelu") != "gelu":
            return f"activation {config.get('hidden_act')!r} is not exact GELU"
        if config.get("position_embedding_type", "absolute") != "absolute":
            return f"position embeddings {config.get('position_embedding_type')!r} are not absolute"
        if config.get("is_decoder") or config.get("add_cross_attention"):
            return "a BERT decoder"
        if set(st_config) - {"max_seq_length", "do_lower_case"}:
            return f"sentence_bert_config.json has other settings: {sorted(st_config)}"
        if not isinstance(st_config.get("max_seq_length"), int):
            return "sentence_bert_config.json names no max_seq_length"
        pooling = _read_json(root / str(modules[1].get("path", "")) / "config.json")
        modes = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
        others = [key for key, value in pooling.items() if key.startswith("pooling_mode") and value]
        if len(modes) != 1 or len(others) != 1:
            return f"pooling modes {others} are not exactly one of cls, mean, max"
        if pooling.get("include_prompt", True) is not True:
            return "pooling excludes a prompt"
        st_settings = root / "config_sentence_transformers.json"
        if st_settings.exists():
            settings = _read_json(st_settings)
            if settings.get("default_prompt_name") or settings.get("prompts"):
                return "the model has prompts"
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.exists():
            return "no tokenizer.json"
        tokenizer = _read_json(tokenizer_file)
        if refusal := _tokenizer_refusal(root, tokenizer):
            return refusal
        if st_config.get("do_lower_case") and not tokenizer["normalizer"].get("lowercase"):
            return "sentence_bert_config.json lowercases but the tokenizer does not"
        dtypes = {
            str(entry.get("dtype")) for entry in _safetensors_header(root / "model.safetensors").values()
        }
        if not dtypes <= {"F32", "I64"}:
            return f"weights are not float32: {sorted(dtypes)}"
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error) as exc:
        return f"cannot read the model's configuration: {exc.__class__.__name__}: {exc}"
    return None


def _tokenizer_refusal(root: Path, tokenizer: dict[str, Any]) -> str | None:
    """transformers rebuilds a BERT tokenizer's normalizer when tokenizer_config.json disagrees with
    tokenizer.json; the fast path uses tokenizer.json as is, so only when they agree."""
    config_file = root / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.exists() else {}
    normalizer = tokenizer.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        return f"tokenizer normalizer {normalizer.get('type')!r} is not BertNormalizer"
    for config_key, normalizer_key in (
        ("do_lower_case", "lowercase"),
        ("strip_accents", "strip_accents"),
        ("tokenize_chinese_chars", "handle_chinese_chars"),
    ):
        if config_key in config and config[config_key] != normalizer.get(normalizer_key):
            return f"tokenizer_config.json's {config_key} disagrees with tokenizer.json"
    if (tokenizer.get("model") or {}).get("type") != "WordPiece":
        return "the tokenizer is not WordPiece"
    return None


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight a BertModel of this config.json uses for sentence embeddings, by transformers'
    name (without the pooler), with its shape."""
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (int(config["vocab_size"]), hidden),
        "embeddings.position_embeddings.weight": (int(config["max_position_embeddings"]), hidden),
        "embeddings.token_type_embeddings.weight": (int(config.get("type_vocab_size", 2)), hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for index in range(int(config["num_hidden_layers"])):
        layer = f"encoder.layer.{index}."
        for name in ("query", "key", "value"):
            shapes[f"{layer}attention.self.{name}.weight"] = (hidden, hidden)
            shapes[f"{layer}attention.self.{name}.bias"] = (hidden,)
        shapes[f"{layer}attention.output.dense.weight"] = (hidden, hidden)
        shapes[f"{layer}attention.output.dense.bias"] = (hidden,)
        shapes[f"{layer}intermediate.dense.weight"] = (inner, hidden)
        shapes[f"{layer}intermediate.dense.bias"] = (inner,)
        shapes[f"{layer}output.dense.weight"] = (hidden, inner)
        shapes[f"{layer}output.dense.bias"] = (hidden,)
        for block in ("attention.output", "output"):
            shapes[f"{layer}{block}.LayerNorm.weight"] = (hidden,)
            shapes[f"{layer}{block}.LayerNorm.bias"] = (hidden,)
    return shapes


def load_weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors by transformers' BertModel names: an optional prefix stripped, the unused
    pooler, heads and index buffers dropped, and anything missing, unexpected or misshapen refused
    with BertWeightsError."""
    weights = load_file(str(path))
    for prefix in WEIGHT_PREFIXES:
        if any(name.startswith(prefix) for name in weights):
            weights = {name.removeprefix(prefix): tensor for name, tensor in weights.items()}
            break
    weights = {name: tensor for name, tensor in weights.items() if not name.startswith(IGNORED_WEIGHTS)}
    expected = weight_shapes(config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise BertWeightsError(
            f"{path} does not hold the weights its config.json describes: "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}"
        )
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name]:
            raise BertWeightsError(
                f"{path}: weight {name} has shape {tuple(tensor.shape)}, config.json implies {expected[name]}"
            )
    return weights


class BertEncoder:
    """transformers' BertModel forward (eval, absolute positions, exact GELU, post-LayerNorm) on a
    dict of its weights; returns the last hidden states."""

    def __init__(
        self, config: dict[str, Any], weights: dict[str, torch.Tensor], *, layers: int | None = None
    ) -> None:
        self.weights = weights
        # `layers` runs only the first few: a cheaper, wrong model for the tests' dishonest agents.
        total = int(config["num_hidden_layers"])
        self.layers = min(layers, total) if layers else total
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of {self.heads} attention heads")

    def _linear(self, states: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(states, self.weights[name + ".weight"], self.weights[name + ".bias"])

    def _layer_norm(self, states: torch.Tensor, name: str) -> torch.Tensor:
        w = self.weights
        return F.layer_norm(states, (self.hidden,), w[name + ".weight"], w[name + ".bias"], self.eps)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = self.weights
        batch, length = input_ids.shape
        token_types = torch.zeros_like(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        states = F.embedding(input_ids, w["embeddings.word_embeddings.weight"]) + F.embedding(
            token_types, w["embeddings.token_type_embeddings.weight"]
        )
        states = states + F.embedding(positions, w["embeddings.position_embeddings.weight"])[None]
        states = self._layer_norm(states, "embeddings.LayerNorm")
        # True = attend; every row keeps its [CLS], so no query attends to nothing.
        mask = attention_mask.bool()[:, None, None, :]
        shape = (batch, length, self.heads, self.hidden // self.heads)
        for index in range(self.layers):
            layer = f"encoder.layer.{index}."
            query, key, value = (
                self._linear(states, f"{layer}attention.self.{name}").view(shape).transpose(1, 2)
                for name in ("query", "key", "value")
            )
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            context = context.transpose(1, 2).reshape(batch, length, self.hidden)
            attended = self._layer_norm(
                self._linear(context, f"{layer}attention.output.dense") + states,
                f"{layer}attention.output.LayerNorm",
            )
            inner = F.gelu(self._linear(attended, f"{layer}intermediate.dense"))  # exact (erf): "gelu"
            states = self._layer_norm(
                self._linear(inner, f"{layer}output.dense") + attended, f"{layer}output.LayerNorm"
            )
        return states


class BertSentenceEncoder:
    """A sentence-transformers BERT pipeline without sentence-transformers: `encode` returns what
    SentenceTransformer(model_dir).encode(inputs, convert_to_numpy=True) returns."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        layers: int | None = None,
    ) -> None:
        root = Path(model_dir)
        config = _read_json(root / "config.json")
        st_config = _read_json(root / "sentence_bert_config.json")
        modules = _read_json(root / "modules.json")
        pooling = _read_json(root / str(modules[1].get("path", "")) / "config.json")
        self.device = torch.device(device)
        self.pooling = next(mode for key, mode in POOLING_MODES.items() if pooling.get(key))
        self.normalize = any(module.get("type") == MODULE_NORMALIZE for module in modules)
        self.max_seq_length = min(int(st_config["max_seq_length"]), int(config["max_position_embeddings"]))
        self.dimension = int(config["hidden_size"])

        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        # tokenizer.json may fix its own truncation and padding (MiniLM's: 128, padded to 128); the model
        # uses max_seq_length and pads each batch to its longest (pad values never reach the output).
        saved_padding = self.tokenizer.padding
        pad_token = str(saved_padding["pad_token"]) if saved_padding else "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            pad_token, pad_id = "[PAD]", int(config.get("pad_token_id") or 0)
        self.tokenizer.enable_truncation(max_length=self.max_seq_length, strategy="longest_first")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=0)

        # Weights (and so every activation) in `dtype`; the index buffers stay integers.
        weights = {
            name: tensor.to(self.device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in load_weights(root / "model.safetensors", config).items()
        }
        self.model = BertEncoder(config, weights, layers=layers)

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def _batch(self, texts: list[str]) -> torch.Tensor:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(
            [e.attention_mask for e in encodings], dtype=torch.long, device=self.device
        )
        # Pooled and normalized in float32 whatever the encoder ran in: the output is float32.
        tokens = self.model(input_ids, attention_mask).float()
        mask = attention_mask[..., None].to(tokens.dtype)
        if self.pooling == "mean":
            pooled = (tokens * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens.masked_fill(mask == 0, -1e9).max(1).values
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def encode(self, inputs: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Like SentenceTransformer.encode: longest texts first in batches (so each batch pads to
        similar lengths), results back in input order, float32 (count, dimension)."""
        if not inputs:
            return np.zeros((0, self.dimension), dtype=np.float32)
        order = np.argsort([-len(text) for text in inputs])  # as sentence-transformers sorts
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                chunks.append(self._batch([inputs[i] for i in order[start : start + batch_size]]))
            pooled = torch.cat(chunks).float().cpu().numpy()
        result = np.empty_like(pooled)
        result[order] = pooled
        return result
