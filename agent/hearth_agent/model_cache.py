"""The content-addressed model cache: fetch manifests and blobs by sha256, verify them, refuse
anything that is not safetensors, and assemble model directories the worker can load offline.

Layout under the cache root:
    blobs/<file sha256>                 verified file contents, read-only, downloaded once
    models/<weights sha256>/<path>      a model directory built from hardlinks to blobs
    manifests/<weights sha256>.json     the manifest the directory was built from
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

log = logging.getLogger(__name__)

MANIFEST_PATH = "/api/v1/agents/models/{sha256}"
BLOB_PATH = "/models/{sha256}"
# Formats that deserialize with pickle can run code on load; only safetensors is accepted.
PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill"})
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class ModelCacheError(Exception):
    """A model could not be made available; `retryable` says whether another attempt may succeed."""

    retryable = True


class ModelRejected(ModelCacheError):
    """The model is unsafe or malformed; fetching it again (on any host) will not help."""

    retryable = False


class ModelFetchError(ModelCacheError):
    """Network trouble or corrupt bytes in transit: worth another attempt."""

    retryable = True


@dataclass(frozen=True)
class ManifestFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    sha256: str
    task_type: str
    dimension: int
    files: tuple[ManifestFile, ...]

    @property
    def weights(self) -> ManifestFile:
        return next(f for f in self.files if f.sha256 == self.sha256)


def manifest_path_check(path: object) -> str:
    """Return the path if it is a plain relative path inside the model dir, else raise ModelRejected."""
    if not isinstance(path, str) or not path or len(path) > 512:
        raise ModelRejected(f"manifest path {path!r} is not a usable file name")
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise ModelRejected(f"manifest path {path!r} must be a relative POSIX path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ModelRejected(f"manifest path {path!r} escapes or is not normalized")
    return path


def manifest_check(data: Any, *, weights_sha256: str) -> Manifest:
    """Validate a manifest from the server before a single blob is fetched."""
    if not isinstance(data, dict):
        raise ModelRejected("model manifest is not a JSON object")
    try:
        sha = str(data["sha256"]).lower()
        raw_files = data["files"]
        name = str(data.get("name", sha[:12]))
        task_type = str(data.get("task_type", "embedding"))
        dimension = int(data.get("dimension", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelRejected(f"model manifest is missing or has a bad field: {exc}") from None
    if sha != weights_sha256:
        raise ModelRejected(f"manifest is for weights {sha}, not the requested {weights_sha256}")
    if task_type != "embedding":
        raise ModelRejected(f"task type {task_type!r} is not supported by this agent")
    if not isinstance(raw_files, list) or not raw_files:
        raise ModelRejected("model manifest lists no files")

    files: list[ManifestFile] = []
    seen: set[str] = set()
    for entry in raw_files:
        if not isinstance(entry, dict):
            raise ModelRejected("model manifest file entry is not an object")
        path = manifest_path_check(entry.get("path"))
        if path in seen:
            raise ModelRejected(f"manifest lists {path!r} twice")
        seen.add(path)
        suffix = PurePosixPath(path).suffix.lower()
        if suffix in PICKLED_SUFFIXES:
            raise ModelRejected(
                f"refusing {path!r}: pickled checkpoints ({suffix}) can run code; use safetensors"
            )
        file_sha = str(entry.get("sha256", "")).lower()
        if not _SHA256.match(file_sha):
            raise ModelRejected(f"manifest entry {path!r} has no valid sha256")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ModelRejected(f"manifest entry {path!r} has no valid size")
        files.append(ManifestFile(path=path, sha256=file_sha, size=size))

    weights = [f for f in files if f.sha256 == sha]
    if not weights:
        raise ModelRejected("manifest does not contain the weights file it is named after")
    if not weights[0].path.endswith(".safetensors"):
        raise ModelRejected(
            f"weights file {weights[0].path!r} is not .safetensors; only safetensors is accepted"
        )
    return Manifest(name=name, sha256=sha, task_type=task_type, dimension=dimension, files=tuple(files))


def safetensors_header_check(path: Path) -> dict[str, Any]:
    """Parse the safetensors header (8-byte LE length + JSON) and check every tensor fits in the file.

    The suffix alone proves nothing: a pickle renamed to .safetensors must be refused here.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ModelRejected(f"{path.name} is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise ModelRejected(f"{path.name} is not safetensors (header length {header_len} is impossible)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ModelRejected(f"{path.name} is not safetensors (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelRejected(f"{path.name} is not safetensors (header is not an object)")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
            or "dtype" not in info
            or "shape" not in info
        ):
            raise ModelRejected(f"{path.name} is not valid safetensors (tensor {key!r} is malformed)")
    return header


class ModelCache:
    """Makes models available locally. One instance per agent; safe for concurrent tasks."""

    def __init__(
        self,
        root: Path,
        *,
        server_url: str,
        host_token: str,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.root = root
        self.server_url = server_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {host_token}"}
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self._owns_client = client is None
        self._locks: dict[str, asyncio.Lock] = {}
        self.blob_downloads = 0
        for sub in ("blobs", "models", "manifests"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def model_dir(self, weights_sha256: str) -> Path:
        return self.root / "models" / weights_sha256

    def cached_models(self) -> list[str]:
        models = self.root / "models"
        return sorted(p.name for p in models.iterdir() if _SHA256.match(p.name) and p.is_dir())

    async def ensure(self, weights_sha256: str) -> Path:
        """Return the model directory, fetching and verifying whatever is missing."""
        sha = weights_sha256.lower()
        if not _SHA256.match(sha):
            raise ModelRejected(f"{weights_sha256!r} is not a sha256")
        target = self.model_dir(sha)
        if target.is_dir():
            return target
        lock = self._locks.setdefault(sha, asyncio.Lock())
        async with lock:
            if target.is_dir():
                return target
            try:
                manifest = await self._fetch_manifest(sha)
                for entry in manifest.files:
                    await self._ensure_blob(entry)
                for entry in manifest.files:
                    if entry.path.endswith(".safetensors"):
                        safetensors_header_check(self._blob_path(entry.sha256))
                self._assemble(manifest)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # Partial downloads are already removed; the owner must free space, the server
                # may give the task to another host meanwhile.
                raise ModelFetchError(
                    f"the disk holding {self.root} is full ({exc.strerror}); free some space for model "
                    f"{sha[:12]} or point $HEARTH_AGENT_CACHE at a bigger disk"
                ) from None
            log.info("model %s (%s) is cached at %s", manifest.name, sha[:12], target)
            return target

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    async def _fetch_manifest(self, sha: str) -> Manifest:
        url = self.server_url + MANIFEST_PATH.format(sha256=sha)
        try:
            response = await self._client.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            raise ModelFetchError(f"cannot fetch the manifest of model {sha[:12]}: {exc}") from None
        if response.status_code == 404:
            raise ModelRejected(f"the server does not know model {sha[:12]}")
        if response.status_code != 200:
            raise ModelFetchError(f"manifest of model {sha[:12]}: HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise ModelRejected(f"manifest of model {sha[:12]} is not JSON") from None
        manifest = manifest_check(data, weights_sha256=sha)
        (self.root / "manifests" / f"{sha}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        return manifest

    async def _ensure_blob(self, entry: ManifestFile) -> Path:
        blob = self._blob_path(entry.sha256)
        if blob.is_file() and blob.stat().st_size == entry.size:
            return blob
        url = self.server_url + BLOB_PATH.format(sha256=entry.sha256)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.root / "blobs")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        written = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async with self._client.stream("GET", url, headers=self._headers) as response:
                    if response.status_code != 200:
                        raise ModelFetchError(f"{entry.path}: HTTP {response.status_code} from {url}")
                    async for chunk in response.aiter_bytes(_CHUNK):
                        written += len(chunk)
                        # Stop a server that sends more than it declared instead of filling the disk.
                        if written > entry.size:
                            raise ModelFetchError(
                                f"{entry.path}: server sent more than the declared {entry.size} bytes"
                            )
                        digest.update(chunk)
                        handle.write(chunk)
            actual = digest.hexdigest()
            if actual != entry.sha256:
                raise ModelFetchError(
                    f"{entry.path}: sha256 mismatch (expected {entry.sha256}, got {actual})"
                )
            if written != entry.size:
                raise ModelFetchError(f"{entry.path}: got {written} bytes, manifest says {entry.size}")
            # Blobs are hardlinked into model dirs; read-only keeps one writer from corrupting all.
            os.chmod(tmp, 0o444)
            os.replace(tmp, blob)
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise ModelFetchError(f"{entry.path}: download failed: {exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.blob_downloads += 1
        log.info("fetched %s (%d bytes, sha256 %s)", entry.path, written, entry.sha256[:12])
        return blob

    def _assemble(self, manifest: Manifest) -> None:
        """Build the model dir next to its final place, then rename it in, so a crash never leaves
        a half-built directory that later looks cached."""
        target = self.model_dir(manifest.sha256)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{manifest.sha256[:12]}-", dir=self.root / "models"))
        try:
            for entry in manifest.files:
                dest = staging / entry.path
                # manifest_path_check already refused "..", this is the belt to its braces.
                if not dest.resolve().is_relative_to(staging.resolve()):
                    raise ModelRejected(f"manifest path {entry.path!r} escapes the model directory")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self._blob_path(entry.sha256), dest)
                except OSError:
                    shutil.copyfile(self._blob_path(entry.sha256), dest)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another agent process sharing this cache won the race; its copy is as good.
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.chmod(target, 0o700)
