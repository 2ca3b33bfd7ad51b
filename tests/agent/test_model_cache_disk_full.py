"""A full disk during a model download is a clear, retryable failure that leaves no partial blob."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hearth_agent import model_cache
from hearth_agent.model_cache import ModelFetchError

from .conftest import FileServer
from .test_model_cache import _ensure, _publish, _safetensors_bytes


def test_it_says_the_disk_is_full_and_leaves_no_partial_blob(
    tmp_path: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = _publish(
        file_server, {"model.safetensors": _safetensors_bytes(tmp_path)}, weights="model.safetensors"
    )
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, mode: str) -> None:
            self.handle = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, chunk: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_cache.os, "fdopen", FullDisk)
    with pytest.raises(ModelFetchError, match="is full") as caught:
        _ensure(tmp_path / "cache", file_server, sha)
    assert caught.value.retryable
    assert "HEARTH_AGENT_CACHE" in str(caught.value)
    assert list((tmp_path / "cache" / "blobs").iterdir()) == []
