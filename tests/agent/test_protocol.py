"""The wire contract as the agent relies on it: round trips, malformed frames, close codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from hearth_agent.protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Heartbeat,
    HeartbeatAck,
    HeartbeatAckPayload,
    HeartbeatPayload,
    Hello,
    HelloPayload,
    ProtocolError,
    TaskAssign,
    TaskAssignPayload,
    TaskResultPayload,
    close_code_is_retryable,
    decode_embeddings,
    dump_frame,
    encode_embeddings,
    parse_frame,
)


def _hello() -> Hello:
    return Hello(
        payload=HelloPayload(
            agent_version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            hostname="box",
            os="Linux",
            cpu_model="cpu",
            cpu_count=2,
            memory_mb=1024,
            device="cpu",
            slots=2,
            isolation=["netns:bwrap"],
        )
    )


def test_it_round_trips_every_frame_the_agent_sends_and_receives() -> None:
    frames = [
        _hello(),
        Heartbeat(payload=HeartbeatPayload(status="busy", free_slots=1, running=["lease-1"])),
        TaskAssign(
            payload=TaskAssignPayload(
                task_id="t1",
                lease_id="l1",
                model_sha256="a" * 64,
                model_name="minilm",
                inputs=["hello", "wörld"],
                lease_expires_at=datetime(2030, 1, 1, tzinfo=UTC),
            )
        ),
    ]
    for frame in frames:
        assert parse_frame(dump_frame(frame)) == frame
        assert parse_frame(dump_frame(frame).encode()) == frame


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", CloseCode.MALFORMED_FRAME),
        ("[1, 2]", CloseCode.MALFORMED_FRAME),
        ('{"type": "nope.v1", "payload": {}}', CloseCode.MALFORMED_FRAME),
        (
            '{"type": "heartbeat.v1", "payload": {"status": "asleep", "free_slots": 0}}',
            CloseCode.MALFORMED_FRAME,
        ),
        ('{"type": "heartbeat.v2", "payload": {}}', CloseCode.UNSUPPORTED_VERSION),
        ("[" * 100_000, CloseCode.MALFORMED_FRAME),
        (b"\xff\xfe", CloseCode.MALFORMED_FRAME),
    ],
)
def test_it_refuses_malformed_frames_with_a_close_code(raw: str | bytes, code: CloseCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_frame(raw)
    assert caught.value.code == code


def test_it_refuses_unknown_fields_in_a_frame() -> None:
    data = json.loads(dump_frame(_hello()))
    data["payload"]["surprise"] = 1
    with pytest.raises(ProtocolError):
        parse_frame(json.dumps(data))


@pytest.mark.parametrize(
    ("field", "value"), [("agent_version", "v" * 41), ("device", "d" * 17), ("memory_mb", 2**31)]
)
def test_a_hello_with_a_value_past_what_the_server_stores_is_malformed_and_names_the_field(
    field: str, value: object
) -> None:
    data = json.loads(dump_frame(_hello()))
    data["payload"][field] = value
    with pytest.raises(ProtocolError) as caught:
        parse_frame(json.dumps(data))
    assert caught.value.code == CloseCode.MALFORMED_FRAME
    assert f"payload.{field}" in str(caught.value)


def test_only_auth_and_version_close_codes_stop_the_agent() -> None:
    fatal = {code for code in CloseCode if not code.retryable}
    assert fatal == {
        CloseCode.UNSUPPORTED_VERSION,
        CloseCode.AUTH_REQUIRED,
        CloseCode.AUTH_FAILED,
        CloseCode.TOKEN_REVOKED,
    }
    assert close_code_is_retryable(None)
    assert close_code_is_retryable(1006)  # abnormal closure: a network drop
    assert close_code_is_retryable(int(CloseCode.MALFORMED_FRAME))
    assert not close_code_is_retryable(int(CloseCode.TOKEN_REVOKED))


def test_embeddings_travel_as_little_endian_float32_with_a_digest() -> None:
    vectors = np.arange(6, dtype="<f4").reshape(2, 3)
    b64, digest = encode_embeddings(vectors.tobytes())
    payload = TaskResultPayload(
        task_id="t",
        lease_id="l",
        dimension=3,
        count=2,
        embeddings_b64=b64,
        output_sha256=digest,
        compute_ms=1.0,
        device="cpu",
    )
    assert np.array_equal(np.frombuffer(decode_embeddings(payload), dtype="<f4").reshape(2, 3), vectors)


def test_a_heartbeat_without_the_ack_field_still_parses_and_asks_for_no_ack() -> None:
    old = '{"type": "heartbeat.v1", "payload": {"status": "idle", "free_slots": 1}}'
    assert parse_frame(old).payload.ack is False


def test_a_heartbeat_ack_names_the_heartbeat_it_answers() -> None:
    beat = Heartbeat(payload=HeartbeatPayload(status="idle", free_slots=1, ack=True))
    ack = parse_frame(dump_frame(HeartbeatAck(payload=HeartbeatAckPayload(heartbeat_id=beat.id))))
    assert isinstance(ack, HeartbeatAck) and ack.payload.heartbeat_id == beat.id
