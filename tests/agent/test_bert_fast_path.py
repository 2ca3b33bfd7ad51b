"""The worker's fast path (hearth_agent.bert) embeds exactly as sentence-transformers does, without
importing it; a model it does not know goes to sentence-transformers, and broken weights are refused."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hearth_agent import bert
from hearth_agent.worker import Worker

AGENT_DIR = Path(__file__).resolve().parents[2] / "agent"


def _varied_sentences() -> list[str]:
    """~200 inputs: short and long (past 256 tokens, so truncated), unicode, empty-ish, odd spacing."""
    sentences = [
        "",
        " ",
        "\t\n",
        ".",
        "!!!",
        "?!…",
        "\u2014 \u2013 -",
        "()[]{}<>",
        "The cat sits on the mat.",
        "  leading and trailing spaces  ",
        "naïve café — unicode ✓",
        "東京は日本の首都です。",
        "Ελληνικά κείμενα και emojis 🔥🏡☀️👍🏽",
        "Привет, мир! Это тест.",
        "مرحبا بالعالم",
        "Zero\u200bwidth and non\u00a0breaking spaces",
        "ALL CAPS SHOUTING ABOUT HOME BATTERIES",
        "URLs https://example.com/a?b=c&d=e and e-mail a.b@example.org",
        "numbers 3.14159 2,718 1e-9 -42 #7 $100 50%",
        "word " * 400,
        " ".join(f"token{i}" for i in range(600)),
        "Solar panels charge the home battery while the GPU idles. " * 40,
        "supercalifragilisticexpialidocious" * 30,
    ]
    words = ["hearth", "runs", "inference", "on", "home", "gpus", "with", "batteries", "solar", "idle"]
    for i in range(180):
        length = 1 + (i * 7) % 60
        text = " ".join(words[(i + j) % len(words)] for j in range(length))
        if i % 5 == 0:
            text = text.upper()
        if i % 7 == 0:
            text += f" ünïcödé {chr(0x4E00 + i)} {chr(0x1F300 + i % 80)}"
        if i % 11 == 0:
            text = f"{text}, {text}; ({text})!"
        sentences.append(text + f" #{i}")
    return sentences


SENTENCES = _varied_sentences()


@pytest.fixture(scope="module")
def sentence_transformer(minilm_source: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_source), device="cpu")


def _copy_model(source: Path, target: Path, *, link_weights: bool = True) -> Path:
    """The model's small files copied, its weights linked (or left out for the caller to write)."""
    target.mkdir(parents=True)
    for path in source.rglob("*"):
        if path.is_file() and path.name != "model.safetensors" and not path.name.endswith(".md"):
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, destination)
    if link_weights:
        (target / "model.safetensors").symlink_to(source / "model.safetensors")
    return target


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def test_minilm_qualifies_for_the_fast_path(minilm_source: Path) -> None:
    assert bert.fast_path_refusal(minilm_source) is None


def test_the_fast_path_embeds_like_sentence_transformers_on_varied_sentences(
    minilm_source: Path, sentence_transformer
) -> None:
    expected = sentence_transformer.encode(SENTENCES, convert_to_numpy=True)
    got = bert.BertSentenceEncoder(minilm_source, device="cpu").encode(SENTENCES)
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    cosine = _cosine(got, expected)
    max_abs_diff = float(np.abs(got - expected).max())
    print(
        f"fast path vs sentence-transformers: min cosine {cosine.min():.8f}, max abs diff {max_abs_diff:.3g}"
    )
    assert cosine.min() >= 0.99999, f"lowest cosine {cosine.min()} at {SENTENCES[int(cosine.argmin())]!r}"
    assert max_abs_diff < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # MiniLM ends in Normalize


def test_the_fast_path_truncates_at_the_models_max_seq_length(minilm_source: Path) -> None:
    encoder = bert.BertSentenceEncoder(minilm_source)
    assert encoder.max_seq_length == 256
    long = "word " * 400
    same_start = long + " and a different ending that is past the limit"
    np.testing.assert_array_equal(encoder.encode([long]), encoder.encode([same_start]))


def test_the_fast_path_pools_as_the_pooling_config_says(minilm_source: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "cls")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = json.loads((model_dir / "modules.json").read_text())[:2]  # and no Normalize
    (model_dir / "modules.json").write_text(json.dumps(modules))
    from sentence_transformers import SentenceTransformer

    inputs = SENTENCES[:40]
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(inputs, convert_to_numpy=True)
    assert bert.fast_path_refusal(model_dir) is None
    got = bert.BertSentenceEncoder(model_dir).encode(inputs)
    assert _cosine(got, expected).min() >= 0.99999
    assert np.allclose(got, expected, atol=1e-4)  # not normalized: the raw [CLS] vectors


def test_a_model_with_an_unknown_module_falls_back_to_sentence_transformers(
    minilm_source: Path, tmp_path: Path, sentence_transformer
) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "with-dropout")
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dropout", "type": "sentence_transformers.models.Dropout"}
    )
    modules[3].update(idx=3, name="3")
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "2_Dropout").mkdir()
    (model_dir / "2_Dropout" / "config.json").write_text(json.dumps({"dropout": 0.2}))

    refusal = bert.fast_path_refusal(model_dir)
    assert refusal is not None and "modules.json" in refusal

    from sentence_transformers import SentenceTransformer

    worker = Worker(device="cpu", max_models=2)
    reply = worker.embed(
        {"id": "t", "model_dir": str(model_dir), "model_sha256": "x" * 64, "inputs": SENTENCES[:20]}
    )
    assert isinstance(worker.models["x" * 64], SentenceTransformer)
    got = np.frombuffer(base64.b64decode(reply["embeddings_b64"]), "<f4").reshape(reply["count"], -1)
    expected = sentence_transformer.encode(SENTENCES[:20], convert_to_numpy=True)  # dropout is off in eval
    assert _cosine(got, expected).min() >= 0.99999
    assert reply["model_loads"] == 1 and reply["load_ms"] > 0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"architectures": ["RobertaModel"], "model_type": "roberta"}, "not a BERT model"),
        ({"hidden_act": "gelu_new"}, "activation"),
        ({"position_embedding_type": "relative_key"}, "position embeddings"),
    ],
)
def test_a_config_the_fast_path_does_not_compute_is_refused(
    minilm_source: Path, tmp_path: Path, change: dict, why: str
) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "other")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    refusal = bert.fast_path_refusal(model_dir)
    assert refusal is not None and why in refusal


def test_missing_weights_raise_a_clear_error(minilm_source: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "broken", link_weights=False)
    weights = load_file(str(minilm_source / "model.safetensors"))
    del weights["encoder.layer.3.intermediate.dense.weight"]
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(
        bert.BertWeightsError, match=r"1 missing \['encoder\.layer\.3\.intermediate\.dense\.weight'\]"
    ):
        bert.BertSentenceEncoder(model_dir)


def test_unexpected_weights_raise_a_clear_error(minilm_source: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "extra", link_weights=False)
    weights = load_file(str(minilm_source / "model.safetensors"))
    weights["encoder.layer.6.output.dense.weight"] = torch.zeros(384, 1536)
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(
        bert.BertWeightsError, match=r"1 unexpected \['encoder\.layer\.6\.output\.dense\.weight'\]"
    ):
        bert.BertSentenceEncoder(model_dir)


def test_prefixed_weight_names_load_like_plain_ones(minilm_source: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(minilm_source, tmp_path / "prefixed", link_weights=False)
    weights = load_file(str(minilm_source / "model.safetensors"))
    save_file(
        {f"bert.{name}": tensor for name, tensor in weights.items()}, str(model_dir / "model.safetensors")
    )
    inputs = SENTENCES[:10]
    plain = bert.BertSentenceEncoder(minilm_source).encode(inputs)
    np.testing.assert_array_equal(bert.BertSentenceEncoder(model_dir).encode(inputs), plain)


def test_the_worker_process_on_the_fast_path_never_imports_transformers(
    minilm_source: Path, sentence_transformer
) -> None:
    """The real worker main() over its pipe; at exit it lists which of the heavy packages it imported."""
    script = (
        "import atexit, json, sys\n"
        "heavy = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers'))\n"
        "atexit.register(lambda: sys.stderr.write('HEAVY ' + json.dumps(heavy()) + '\\n'))\n"
        "from hearth_agent.worker import main\n"
        "raise SystemExit(main())\n"
    )
    request = {
        "type": "embed",
        "id": "1",
        "model_dir": str(minilm_source),
        "model_sha256": "m",
        "inputs": SENTENCES[:8],
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(AGENT_DIR),
        "HEARTH_WORKER_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    ready, result = (json.loads(line) for line in done.stdout.splitlines())
    assert ready["type"] == "ready", ready
    assert result["type"] == "result", result
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    assert heavy == ["HEAVY []"], done.stderr[-2000:]
    got = np.frombuffer(base64.b64decode(result["embeddings_b64"]), "<f4").reshape(result["count"], -1)
    expected = sentence_transformer.encode(SENTENCES[:8], convert_to_numpy=True)
    assert _cosine(got, expected).min() >= 0.99999
