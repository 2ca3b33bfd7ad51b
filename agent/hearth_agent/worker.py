"""The inference worker process (`python -m hearth_agent.worker`): probes its own sandbox, keeps
models warm, and embeds batches on request. It speaks newline-delimited JSON with the supervisor:

    worker → agent   {"type": "ready", "pid", "probe": {...}, "torch_version", "device", "gpus", "threads"}
    agent  → worker  {"type": "embed", "id", "model_dir", "model_sha256", "inputs": [str]}
    worker → agent   {"type": "result", "id", "count", "dimension", "embeddings_b64", "compute_ms",
                      "load_ms", "model_loads", "warm": [model sha256], "device"}
                   | {"type": "error", "id", "reason", "retryable"}
    agent  → worker  {"type": "probe", "id", "addr": "host:port"}   (re-check network isolation)
    worker → agent   {"type": "probe", "id", "net_reachable": bool}
    agent  → worker  {"type": "run_probe", "id", "name", "params"}   (an escape probe, see probes.py)
    worker → agent   {"type": "probe_result", "id", "name", "result": {...}}

Every request may carry "cpu_budget_s" (its RLIMIT_CPU soft budget); every reply carries "cpu_s"
(the worker's CPU time so far); an error reply may carry "violation" (the worker must be replaced).
Before reading any request the worker confines itself (confine.py: rlimits from
$HEARTH_WORKER_CONFINE, seccomp) and the ready message says what took.

Only this module (with bert.py, its fast path) imports torch: the agent process stays small and never
runs model code.

$HEARTH_WORKER_DTYPE (float32 | bfloat16 | float16) is the precision the fast path's encoder runs in:
an honest choice of the host's, vectors within 0.9998 cosine of float32's. A model on the
sentence-transformers fallback stays float32 (pooled in bfloat16 there, MiniLM drops to ~0.9987).
$HEARTH_WORKER_CHEAT_LAYERS is not honest: it runs only that many transformer layers, for the
tests' dishonest agents (cheat.py, mode `cheaper`); the fast path only.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from hearth_agent.confine import confine_self, cpu_budget_set, cpu_seconds_used
from hearth_agent.probes import probe_run

PR_SET_PDEATHSIG = 1
DTYPE_ENV = "HEARTH_WORKER_DTYPE"
DTYPES = ("float32", "bfloat16", "float16")
CHEAT_LAYERS_ENV = "HEARTH_WORKER_CHEAT_LAYERS"


def worker_dtype(env: Mapping[str, str]) -> str:
    """The precision the encoder runs in; float32 unless the host chose otherwise."""
    dtype = env.get(DTYPE_ENV) or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"${DTYPE_ENV} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def cheat_layers(env: Mapping[str, str]) -> int | None:
    """Test-only: run only this many transformer layers (None: all of them, honestly)."""
    text = env.get(CHEAT_LAYERS_ENV)
    if not text:
        return None
    layers = int(text)
    if layers < 1:
        raise ValueError(f"${CHEAT_LAYERS_ENV} must be at least 1, got {text!r}")
    return layers


def set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL us when our parent dies, so an agent crash never leaves a worker behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # Not Linux: the supervisor's kill on exit is the only guard.


def probe_sandbox(env: dict[str, str]) -> dict[str, Any]:
    """Test the sandbox from the inside; the agent compares the answers with what it expected."""
    result: dict[str, Any] = {}
    addr = env.get("HEARTH_PROBE_ADDR")
    if addr:
        host, _, port = addr.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                result["net_reachable"] = True
        except OSError as exc:
            result["net_reachable"] = False
            result["net_error"] = exc.__class__.__name__
    ro_path = env.get("HEARTH_PROBE_RO_PATH")
    if ro_path:
        try:
            fd = os.open(ro_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            result["ro_writable"] = True
        except OSError as exc:
            result["ro_writable"] = exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM)
    marker = env.get("HEARTH_PROBE_TMP_MARKER")
    if marker:
        result["tmp_marker_visible"] = os.path.exists(marker)
    if home_marker := env.get("HEARTH_PROBE_HOME_MARKER"):
        result["home_marker_visible"] = os.path.exists(home_marker)
    if write_paths := env.get("HEARTH_PROBE_WRITE_PATHS"):
        written = []
        for path in write_paths.split(os.pathsep):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                written.append(path)
            except FileExistsError:
                written.append(path)  # the ro-root check above already created it
            except OSError:
                pass
        result["written_outside"] = written
        scratch = env.get("TMPDIR") or "/tmp"
        try:
            probe_file = os.path.join(scratch, ".hearth-scratch-probe")
            with open(probe_file, "wb") as handle:
                handle.write(b"ok")
            os.unlink(probe_file)
            result["scratch_writable"] = True
        except OSError:
            result["scratch_writable"] = False
    if agent_pid := env.get("HEARTH_PROBE_AGENT_PID"):
        result["agent_pid_visible"] = os.path.exists(f"/proc/{int(agent_pid)}")
    result["pid"] = os.getpid()
    return result


class Worker:
    """Holds warm models (LRU, bounded) and embeds batches."""

    def __init__(
        self, *, device: str, max_models: int, dtype: str = "float32", layers: int | None = None
    ) -> None:
        self.device = device
        self.max_models = max_models
        self.dtype = dtype
        self.layers = layers
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.loads = 0

    def model_for(self, model_dir: str, key: str) -> tuple[Any, float]:
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key], 0.0
        import torch

        from hearth_agent import bert

        started = time.perf_counter()
        model: Any
        if bert.fast_path_refusal(model_dir) is None:
            # A plain BERT sentence encoder: same vectors without importing transformers (seconds).
            model = bert.BertSentenceEncoder(
                model_dir, device=self.device, dtype=getattr(torch, self.dtype), layers=self.layers
            )
        else:
            model = self._sentence_transformer(model_dir)
        load_ms = (time.perf_counter() - started) * 1000
        self.loads += 1
        self.models[key] = model
        while len(self.models) > self.max_models:
            self.models.popitem(last=False)
        return model, load_ms

    def _sentence_transformer(self, model_dir: str) -> Any:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(
            model_dir,
            device=self.device,
            local_files_only=True,
            trust_remote_code=False,
            # Belt and braces with the cache's refusal of pickles: transformers must not fall back to torch.load.
            model_kwargs={"use_safetensors": True},
        )
        model.eval()
        return model

    def embed(self, request: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        from hearth_agent import bert

        inputs = request["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise ValueError("inputs must be a list of strings")
        model, load_ms = self.model_for(
            str(request["model_dir"]), str(request.get("model_sha256") or request["model_dir"])
        )
        started = time.perf_counter()
        with torch.inference_mode():
            # The model's own pipeline (incl. its Normalize module, if any) decides normalization.
            if isinstance(model, bert.BertSentenceEncoder):
                vectors = model.encode(inputs)
            else:
                vectors = model.encode(inputs, convert_to_numpy=True, show_progress_bar=False)
        compute_ms = (time.perf_counter() - started) * 1000
        dimension = model.get_sentence_embedding_dimension()
        array = (
            np.asarray(vectors, dtype="<f4").reshape(len(inputs), -1)
            if inputs
            else np.zeros((0, dimension), "<f4")
        )
        return {
            "type": "result",
            "id": request["id"],
            "count": int(array.shape[0]),
            "dimension": int(array.shape[1] if array.shape[0] else dimension or 0),
            "embeddings_b64": base64.b64encode(array.tobytes()).decode("ascii"),
            "compute_ms": compute_ms,
            "load_ms": load_ms,
            "model_loads": self.loads,
            "warm": list(self.models),
            "device": self.device,
        }


def _send(channel: IO[str], message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def main() -> int:
    set_parent_death_signal()
    # Libraries print to stdout; keep the protocol on a private dup and send fd 1 to stderr.
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # Before anything else runs in here: limits and the seccomp filter hold for all that follows.
    confinement = confine_self(json.loads(os.environ.get("HEARTH_WORKER_CONFINE") or "{}"))
    probe = probe_sandbox(dict(os.environ))

    import torch

    if threads := os.environ.get("HEARTH_WORKER_THREADS"):
        torch.set_num_threads(max(1, int(threads)))
    device = os.environ.get("HEARTH_WORKER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_mb": int(props.total_memory // (1024 * 1024))})
    # Pay the fast path's imports (tokenizers, safetensors) before saying ready. sentence-transformers
    # (and transformers, ~9 s on a small CPU) is imported only for a model the fast path refuses.
    from hearth_agent import bert  # noqa: F401

    worker = Worker(
        device=device,
        max_models=int(os.environ.get("HEARTH_WORKER_MAX_MODELS", "2")),
        dtype=worker_dtype(os.environ),
        layers=cheat_layers(os.environ),
    )
    _send(
        channel,
        {
            "type": "ready",
            "pid": os.getpid(),
            "probe": probe,
            "confinement": confinement,
            "torch_version": str(torch.__version__),
            "device": device,
            "gpus": gpus,
            "threads": torch.get_num_threads(),
            "dtype": worker.dtype,
            "cheat_layers": worker.layers,
        },
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        _send(channel, _handle(worker, line))
    return 0


def _handle(worker: Worker, line: str) -> dict[str, Any]:
    request: dict[str, Any] = {}
    try:
        request = json.loads(line)
        budget = request.get("cpu_budget_s")
        # The kernel sends SIGXCPU (fatal) once this request has used its CPU budget.
        cpu_budget_set(float(budget) if budget else None)
        try:
            if request.get("type") == "embed":
                reply = worker.embed(request)
            elif request.get("type") == "run_probe":
                name = str(request["name"])
                reply = {
                    "type": "probe_result",
                    "id": request["id"],
                    "name": name,
                    "result": probe_run(name, dict(request.get("params") or {})),
                }
            elif request.get("type") == "probe":
                reply = {
                    "type": "probe",
                    "id": request["id"],
                    **probe_sandbox({"HEARTH_PROBE_ADDR": request["addr"]}),
                }
            else:
                raise ValueError(f"unknown request type {request.get('type')!r}")
        finally:
            cpu_budget_set(None)
    except MemoryError:
        # The address-space limit stopped an allocation; the supervisor retires this worker.
        reply = {
            "type": "error",
            "id": request.get("id"),
            "reason": "the batch ran out of memory in the worker",
            "retryable": True,
            "violation": "MemoryError",
        }
    except Exception as exc:  # One bad batch must not kill a warm worker.
        reply = {
            "type": "error",
            "id": request.get("id"),
            "reason": f"{exc.__class__.__name__}: {exc}"[:2000],
            "retryable": not isinstance(exc, (ValueError, TypeError, KeyError)),
        }
    reply["cpu_s"] = round(cpu_seconds_used(), 3)
    return reply


if __name__ == "__main__":
    raise SystemExit(main())
