"""Enrollment tokens are exchanged once for a host token that can be revoked."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.hosts.services import (
    enrollment_token_create,
    host_authenticate,
    host_enroll,
    host_token_revoke,
)

pytestmark = pytest.mark.django_db


def test_an_enrollment_token_works_once(host_owner: Any) -> None:
    token = enrollment_token_create(owner=host_owner).plaintext
    enrolled = host_enroll(enrollment_token=token, name="garage-pc")
    assert host_authenticate(host_token=enrolled.host_token) == enrolled.host
    with pytest.raises(ValidationError, match="already used"):
        host_enroll(enrollment_token=token, name="garage-pc")


def test_an_expired_enrollment_token_is_refused(host_owner: Any) -> None:
    token = enrollment_token_create(owner=host_owner).plaintext
    with (
        time_machine.travel(timezone.now() + timedelta(days=2)),
        pytest.raises(ValidationError, match="expired"),
    ):
        host_enroll(enrollment_token=token, name="late")


def test_a_revoked_host_token_no_longer_authenticates(host_owner: Any) -> None:
    enrolled = host_enroll(enrollment_token=enrollment_token_create(owner=host_owner).plaintext, name="m")
    host_token_revoke(host=enrolled.host)
    assert host_authenticate(host_token=enrolled.host_token) is None


def test_the_enroll_endpoint_names_the_token_field() -> None:
    response = APIClient().post("/api/v1/agents/enroll", {"token": "he_bogus", "name": "m"}, format="json")
    assert response.status_code == 400
    assert response.json() == {"token": ["enrollment token is invalid or expired"]}


def test_model_files_need_a_host_token(catalog: Any, host_owner: Any) -> None:
    enrolled = host_enroll(enrollment_token=enrollment_token_create(owner=host_owner).plaintext, name="m")
    path = f"/models/{catalog.weights_sha256}"
    assert APIClient().get(path).status_code == 401
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {enrolled.host_token}")
    response = client.get(path)
    assert response.status_code == 200
    assert int(response["Content-Length"]) > 80_000_000
    manifest = client.get(f"/api/v1/agents/models/{catalog.weights_sha256}").json()
    assert {"model.safetensors", "tokenizer.json", "modules.json"} <= {f["path"] for f in manifest["files"]}
    assert all(not f["path"].endswith((".bin", ".pt", ".pkl")) for f in manifest["files"])
