"""The model cache: verified, safetensors-only, each blob downloaded once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hearth_agent.model_cache import ModelCache, ModelFetchError, ModelRejected

from .conftest import FileServer

TOKEN = "host-token"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(path))
    return path.read_bytes()


def _publish(
    server: FileServer, files: dict[str, bytes], *, weights: str, extra: dict[str, Any] | None = None
) -> str:
    """Serve a manifest for `files` (path → bytes) whose weights are files[weights]; return its sha."""
    weights_sha = _sha(files[weights])
    entries = []
    for path, body in files.items():
        server.add_bytes(f"/models/{_sha(body)}", body)
        entries.append({"path": path, "sha256": _sha(body), "size": len(body)})
    manifest = {
        "name": "tiny",
        "sha256": weights_sha,
        "task_type": "embedding",
        "dimension": 4,
        "files": entries,
    }
    manifest.update(extra or {})
    server.add_json(f"/api/v1/agents/models/{weights_sha}", manifest)
    return weights_sha


def _ensure(root: Path, server: FileServer, sha: str) -> tuple[Path, ModelCache]:
    async def go() -> tuple[Path, ModelCache]:
        cache = ModelCache(root, server_url=server.url, host_token=TOKEN)
        try:
            return await cache.ensure(sha), cache
        finally:
            await cache.aclose()

    return asyncio.run(go())


def test_it_assembles_a_verified_model_dir_and_sends_the_host_token(
    tmp_path: Path, file_server: FileServer
) -> None:
    weights = _safetensors_bytes(tmp_path)
    sha = _publish(
        file_server,
        {"model.safetensors": weights, "1_Pooling/config.json": b"{}"},
        weights="model.safetensors",
    )
    model_dir, cache = _ensure(tmp_path / "cache", file_server, sha)
    assert model_dir == tmp_path / "cache" / "models" / sha
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert (model_dir / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert cache.cached_models() == [sha]
    assert {auth for _, auth in file_server.requests} == {f"Bearer {TOKEN}"}


def test_a_cached_model_is_not_downloaded_again(tmp_path: Path, file_server: FileServer) -> None:
    weights = _safetensors_bytes(tmp_path)
    sha = _publish(
        file_server, {"model.safetensors": weights, "config.json": b"{}"}, weights="model.safetensors"
    )
    _ensure(tmp_path / "cache", file_server, sha)
    assert len(file_server.requests) == 3
    _, cache = _ensure(tmp_path / "cache", file_server, sha)
    assert len(file_server.requests) == 3
    assert cache.blob_downloads == 0


def test_a_blob_shared_by_two_models_is_downloaded_once(tmp_path: Path, file_server: FileServer) -> None:
    first = _safetensors_bytes(tmp_path)
    save_file({"weight": torch.ones(2, 2)}, str(tmp_path / "other.safetensors"))
    second = (tmp_path / "other.safetensors").read_bytes()
    tokenizer = b'{"vocab": 1}'
    sha1 = _publish(
        file_server, {"model.safetensors": first, "tokenizer.json": tokenizer}, weights="model.safetensors"
    )
    _ensure(tmp_path / "cache", file_server, sha1)
    sha2 = _publish(
        file_server, {"model.safetensors": second, "tokenizer.json": tokenizer}, weights="model.safetensors"
    )
    _, cache = _ensure(tmp_path / "cache", file_server, sha2)
    assert cache.blob_downloads == 1
    assert file_server.paths_requested().count(f"/models/{_sha(tokenizer)}") == 1


def test_it_refuses_a_file_whose_digest_does_not_match(tmp_path: Path, file_server: FileServer) -> None:
    weights = _safetensors_bytes(tmp_path)
    config = b'{"a": 1}'
    sha = _publish(
        file_server, {"model.safetensors": weights, "config.json": config}, weights="model.safetensors"
    )
    file_server.add_bytes(f"/models/{_sha(config)}", b'{"a": 2}')  # same size, other bytes
    with pytest.raises(ModelFetchError, match="sha256 mismatch"):
        _ensure(tmp_path / "cache", file_server, sha)
    blobs = tmp_path / "cache" / "blobs"
    assert not (blobs / _sha(config)).exists()
    assert not [p for p in blobs.iterdir() if p.name.startswith(".tmp")]
    assert not (tmp_path / "cache" / "models" / sha).exists()


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "extra.pth", "state.pkl", "x.pickle", "last.ckpt"]
)
def test_it_refuses_a_pickled_checkpoint(tmp_path: Path, file_server: FileServer, name: str) -> None:
    weights = _safetensors_bytes(tmp_path)
    pickled = pickle.dumps({"weight": [1, 2, 3]})
    sha = _publish(file_server, {"model.safetensors": weights, name: pickled}, weights="model.safetensors")
    with pytest.raises(ModelRejected, match="pickled") as caught:
        _ensure(tmp_path / "cache", file_server, sha)
    assert caught.value.retryable is False
    assert not any(p.startswith("/models/") for p in file_server.paths_requested())


def test_it_refuses_weights_that_are_not_named_safetensors(tmp_path: Path, file_server: FileServer) -> None:
    sha = _publish(file_server, {"model.onnx": _safetensors_bytes(tmp_path)}, weights="model.onnx")
    with pytest.raises(ModelRejected, match=r"not \.safetensors"):
        _ensure(tmp_path / "cache", file_server, sha)


def test_it_refuses_a_pickle_renamed_to_safetensors(tmp_path: Path, file_server: FileServer) -> None:
    fake = pickle.dumps({"weight": list(range(100))})
    sha = _publish(file_server, {"model.safetensors": fake}, weights="model.safetensors")
    with pytest.raises(ModelRejected, match="is not safetensors"):
        _ensure(tmp_path / "cache", file_server, sha)
    assert not (tmp_path / "cache" / "models" / sha).exists()


def test_it_refuses_a_safetensors_header_whose_tensors_overrun_the_file(
    tmp_path: Path, file_server: FileServer
) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    body = struct.pack("<Q", len(header)) + header + b"\x00" * 16
    sha = _publish(file_server, {"model.safetensors": body}, weights="model.safetensors")
    with pytest.raises(ModelRejected, match="malformed"):
        _ensure(tmp_path / "cache", file_server, sha)


@pytest.mark.parametrize("path", ["../evil.json", "a/../../evil", "/etc/passwd", "a//b", "./x", "a\\..\\b"])
def test_it_refuses_paths_that_escape_the_model_dir(
    tmp_path: Path, file_server: FileServer, path: str
) -> None:
    weights = _safetensors_bytes(tmp_path)
    sha = _publish(file_server, {"model.safetensors": weights, path: b"{}"}, weights="model.safetensors")
    with pytest.raises(ModelRejected):
        _ensure(tmp_path / "cache", file_server, sha)
    assert not (tmp_path / "evil.json").exists()


def test_it_refuses_a_manifest_for_other_weights(tmp_path: Path, file_server: FileServer) -> None:
    weights = _safetensors_bytes(tmp_path)
    sha = _publish(
        file_server, {"model.safetensors": weights}, weights="model.safetensors", extra={"sha256": "b" * 64}
    )
    with pytest.raises(ModelRejected, match="not the requested"):
        _ensure(tmp_path / "cache", file_server, sha)


def test_an_unreachable_server_is_a_retryable_failure(tmp_path: Path) -> None:
    async def go() -> None:
        cache = ModelCache(tmp_path, server_url="http://127.0.0.1:9", host_token=TOKEN)
        try:
            await cache.ensure("c" * 64)
        finally:
            await cache.aclose()

    with pytest.raises(ModelFetchError) as caught:
        asyncio.run(go())
    assert caught.value.retryable is True
