"""The dev stack's job wait says which request failed and how, instead of failing to parse an error page."""

from __future__ import annotations

import uuid

import pytest

from marketplace.devstack import LocalStack

pytestmark = pytest.mark.integration


def test_waiting_on_a_job_the_server_cannot_show_names_the_request_and_its_status(stack: LocalStack) -> None:
    job_id = str(uuid.uuid4())
    with pytest.raises(RuntimeError, match=rf"GET /api/v1/jobs/{job_id} answered 404: ") as raised:
        stack.wait_job(api_key=stack.buyer(), job_id=job_id, timeout=10)
    assert "==== server.log\n" in str(raised.value)  # the server's own account, beside the agents'
