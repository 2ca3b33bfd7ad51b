"""The agent ⇄ server wire protocol: versioned frames, one parser, close codes.

Both the Django server and the host agent import this module; it depends on
pydantic only, so the agent distribution stays free of Django.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hearth_agent.policy import EnergyPolicy

PROTOCOL_VERSION = 1
WS_PATH = "/ws/agent/"
MAX_FRAME_BYTES = 16 * 1024 * 1024


class CloseCode(enum.IntEnum):
    """Websocket close codes; `retryable` tells the agent whether to reconnect."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MALFORMED_FRAME = 4000
    UNSUPPORTED_VERSION = 4001
    AUTH_REQUIRED = 4002
    AUTH_FAILED = 4003
    TOKEN_REVOKED = 4004
    REPLACED = 4008
    SERVER_RESTART = 4009

    @property
    def retryable(self) -> bool:
        return self not in _FATAL_CLOSE_CODES


_FATAL_CLOSE_CODES = frozenset(
    {
        CloseCode.UNSUPPORTED_VERSION,
        CloseCode.AUTH_REQUIRED,
        CloseCode.AUTH_FAILED,
        CloseCode.TOKEN_REVOKED,
    }
)


def close_code_is_retryable(code: int | None) -> bool:
    """Unknown codes (network drops, server crashes) are worth retrying."""
    try:
        return CloseCode(code).retryable if code is not None else True
    except ValueError:
        return True


class ProtocolError(Exception):
    """A frame that does not parse; carries the close code to send."""

    def __init__(self, message: str, code: CloseCode = CloseCode.MALFORMED_FRAME) -> None:
        super().__init__(message)
        self.code = code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _frame_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


# ---- payloads -------------------------------------------------------------


class GpuInfo(_Strict):
    name: str
    memory_mb: int = Field(ge=0)


class BenchmarkReport(_Strict):
    """What `hearth-agent benchmark` measured on this machine; the server checks it against the
    device the agent claims (marketplace.trust.hardware)."""

    key: str = Field(description="hash of hardware + agent + torch version the numbers belong to")
    measured_at: str
    device: str = Field(description="'cuda' or 'cpu'")
    device_name: str
    cpu_count: int = Field(ge=1)
    matmul_fp32_gflops: float = Field(ge=0)
    matmul_half_gflops: float | None = Field(default=None, ge=0)
    half_dtype: str | None = Field(default=None, description="'bfloat16' or 'float16': the faster safe one")
    memory_bandwidth_gbs: float = Field(ge=0)
    max_alloc_mb: int = Field(ge=0, description="largest single allocation that succeeded on the device")
    minilm_items_per_s: float | None = Field(default=None, ge=0)
    minilm_batch: int | None = Field(default=None, ge=1, description="the tuned batch size")


class HelloPayload(_Strict):
    # Bounded as the server stores them (a value past a column's size was a database error on
    # PostgreSQL, and the socket closed as a server fault the agent retried forever).
    agent_version: str = Field(max_length=40)
    protocol_version: int
    hostname: str
    os: str
    cpu_model: str
    cpu_count: int = Field(ge=1)
    memory_mb: int = Field(ge=0, le=2**31 - 1)
    gpus: list[GpuInfo] = []
    torch_version: str | None = None
    device: str = Field(max_length=16, description="'cuda' or 'cpu': where the worker runs")
    cached_models: list[str] = Field(default=[], description="sha256 of cached weights")
    slots: int = Field(ge=1, le=64)
    isolation: list[str] = Field(default=[], description="sandbox layers the worker actually got")
    benchmark: BenchmarkReport | None = Field(default=None, description="cached benchmark, if any")


class WelcomePayload(_Strict):
    host_id: str
    heartbeat_interval_s: float = Field(gt=0)
    server_version: str


class ReadyPayload(_Strict):
    models: list[str] = Field(description="sha256 of weights loaded warm in the worker")
    free_slots: int = Field(ge=0)
    isolation: list[str] = []


class HeartbeatPayload(_Strict):
    status: Literal["idle", "busy", "draining"]
    free_slots: int = Field(ge=0)
    running: list[str] = Field(default=[], description="lease ids the agent holds")
    # Optional and off by default, so old agents and old servers keep speaking to new ones.
    ack: bool = Field(default=False, description="ask the server to answer with heartbeat.ack")


class HeartbeatAckPayload(_Strict):
    heartbeat_id: str = Field(description="the `id` of the heartbeat frame being answered")


class TaskAssignPayload(_Strict):
    task_id: str
    lease_id: str
    model_sha256: str
    model_name: str
    inputs: list[str]
    lease_expires_at: datetime


class TaskResultPayload(_Strict):
    task_id: str
    lease_id: str
    dimension: int = Field(ge=1)
    count: int = Field(ge=0)
    embeddings_b64: str = Field(description="little-endian float32, count × dimension")
    output_sha256: str
    compute_ms: float = Field(ge=0)
    device: str
    energy_wh: float | None = Field(default=None, ge=0, description="energy the batch used")
    energy_source: Literal["nvml", "estimate"] | None = None


class TaskFailedPayload(_Strict):
    task_id: str
    lease_id: str
    reason: str
    retryable: bool = True


class TaskReleasePayload(_Strict):
    """The agent hands a lease back unrun (draining): requeued without counting as an attempt."""

    task_id: str
    lease_id: str
    reason: str


class PowerPayload(_Strict):
    """One reading of the machine and its site, sent every power interval."""

    source: Literal["nvml", "powerwall", "simulator", "none"]
    gpu_w: float | None = Field(default=None, ge=0)
    battery_soc_pct: float | None = Field(default=None, ge=0, le=100)
    solar_w: float | None = Field(default=None, ge=0)
    grid_w: float | None = Field(default=None, description="positive: importing from the grid")
    load_w: float | None = Field(default=None, ge=0)
    work_allowed: bool = Field(description="the agent's own verdict under its policy")
    reason: str = ""


class DrainPayload(_Strict):
    """Agent → server: the owner wants the machine (draining=True) or gives it back (False)."""

    draining: bool
    reason: str


class ConfigPayload(_Strict):
    """Server → agent: the owner's policy, pushed live."""

    policy: EnergyPolicy
    power_interval_s: float = Field(gt=0)


class BenchmarkRequestPayload(_Strict):
    """Server → agent: measure again (periodic or random re-check); answered with `benchmark`."""

    reason: str


class TaskCancelPayload(_Strict):
    task_id: str
    lease_id: str
    reason: str


class TaskRejectedPayload(_Strict):
    task_id: str
    lease_id: str
    reason: str


# ---- frames ---------------------------------------------------------------


class _Frame(_Strict):
    id: str = Field(default_factory=_frame_id)
    sent_at: datetime = Field(default_factory=_now)


class Hello(_Frame):
    type: Literal["hello.v1"] = "hello.v1"
    payload: HelloPayload


class Welcome(_Frame):
    type: Literal["welcome.v1"] = "welcome.v1"
    payload: WelcomePayload


class Ready(_Frame):
    type: Literal["ready.v1"] = "ready.v1"
    payload: ReadyPayload


class Heartbeat(_Frame):
    type: Literal["heartbeat.v1"] = "heartbeat.v1"
    payload: HeartbeatPayload


class HeartbeatAck(_Frame):
    """Sent only for a heartbeat that asked (`ack: true`): a round trip for probes and benchmarks."""

    type: Literal["heartbeat.ack.v1"] = "heartbeat.ack.v1"
    payload: HeartbeatAckPayload


class TaskAssign(_Frame):
    type: Literal["task.assign.v1"] = "task.assign.v1"
    payload: TaskAssignPayload


class TaskResult(_Frame):
    type: Literal["task.result.v1"] = "task.result.v1"
    payload: TaskResultPayload


class TaskFailed(_Frame):
    type: Literal["task.failed.v1"] = "task.failed.v1"
    payload: TaskFailedPayload


class TaskRelease(_Frame):
    type: Literal["task.release.v1"] = "task.release.v1"
    payload: TaskReleasePayload


class Power(_Frame):
    type: Literal["power.v1"] = "power.v1"
    payload: PowerPayload


class Drain(_Frame):
    type: Literal["drain.v1"] = "drain.v1"
    payload: DrainPayload


class Config(_Frame):
    type: Literal["config.v1"] = "config.v1"
    payload: ConfigPayload


class TaskCancel(_Frame):
    type: Literal["task.cancel.v1"] = "task.cancel.v1"
    payload: TaskCancelPayload


class TaskRejected(_Frame):
    type: Literal["task.rejected.v1"] = "task.rejected.v1"
    payload: TaskRejectedPayload


class BenchmarkRequest(_Frame):
    type: Literal["benchmark.request.v1"] = "benchmark.request.v1"
    payload: BenchmarkRequestPayload


class Benchmark(_Frame):
    type: Literal["benchmark.v1"] = "benchmark.v1"
    payload: BenchmarkReport


AgentFrame = Hello | Ready | Heartbeat | TaskResult | TaskFailed | TaskRelease | Power | Drain | Benchmark
ServerFrame = Welcome | HeartbeatAck | TaskAssign | TaskCancel | TaskRejected | Config | BenchmarkRequest
Frame = Annotated[
    Hello
    | Welcome
    | Ready
    | Heartbeat
    | HeartbeatAck
    | TaskAssign
    | TaskResult
    | TaskFailed
    | TaskRelease
    | TaskCancel
    | TaskRejected
    | Power
    | Drain
    | Config
    | BenchmarkRequest
    | Benchmark,
    Field(discriminator="type"),
]
_FRAME_ADAPTER: TypeAdapter[Any] = TypeAdapter(Frame)


def parse_frame(raw: str | bytes) -> Any:
    """Parse one frame; raise ProtocolError with the close code to use."""
    # len() of a str counts characters, which can undercount bytes by 4x.
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested JSON ("[[[[…") would otherwise escape as a crash, not a close.
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("frame must be a JSON object")
    frame_type = data.get("type")
    if isinstance(frame_type, str) and "." in frame_type:
        version = frame_type.rsplit(".", 1)[-1]
        if version.startswith("v") and version[1:].isdigit() and int(version[1:]) > PROTOCOL_VERSION:
            raise ProtocolError(f"frame version {version} is not supported", CloseCode.UNSUPPORTED_VERSION)
    try:
        return _FRAME_ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid frame at {where or 'root'}: {first['msg']}") from exc


def dump_frame(frame: _Frame) -> str:
    return frame.model_dump_json()


# ---- embeddings on the wire -----------------------------------------------


def encode_embeddings(raw_float32_le: bytes) -> tuple[str, str]:
    """Return (base64 text, sha256 hex) of little-endian float32 bytes."""
    return base64.b64encode(raw_float32_le).decode("ascii"), hashlib.sha256(raw_float32_le).hexdigest()


def decode_embeddings(payload: TaskResultPayload) -> bytes:
    """Decode and check a result's vectors; raise ProtocolError when inconsistent."""
    try:
        raw = base64.b64decode(payload.embeddings_b64, validate=True)
    except ValueError as exc:
        raise ProtocolError("embeddings_b64 is not base64") from exc
    expected = payload.count * payload.dimension * 4
    if len(raw) != expected:
        raise ProtocolError(f"embeddings hold {len(raw)} bytes, expected {expected}")
    if hashlib.sha256(raw).hexdigest() != payload.output_sha256:
        raise ProtocolError("output_sha256 does not match the embeddings")
    return raw
