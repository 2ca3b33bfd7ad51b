"""API keys: shown once, stored hashed, named, revocable."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from marketplace.accounts.models import ApiKey

pytestmark = pytest.mark.django_db


def test_signup_then_a_key_created_with_the_password_authenticates_the_api() -> None:
    anonymous = APIClient()
    signup = anonymous.post(
        "/api/v1/auth/signup", {"email": "ada@example.com", "password": "a-long-passphrase"}, format="json"
    )
    assert signup.status_code == 201
    assert signup.json()["role"] == "buyer"
    basic = APIClient()
    basic.credentials(
        HTTP_AUTHORIZATION="Basic "
        + __import__("base64").b64encode(b"ada@example.com:a-long-passphrase").decode()
    )
    created = basic.post("/api/v1/keys", {"name": "ci"}, format="json")
    assert created.status_code == 201
    key = created.json()["key"]
    keyed = APIClient()
    keyed.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert keyed.get("/api/v1/jobs").status_code == 200


def test_the_plaintext_key_is_shown_once_and_not_stored(api: APIClient) -> None:
    created = api.post("/api/v1/keys", {"name": "laptop"}, format="json").json()
    stored = ApiKey.objects.get(pk=created["id"])
    assert created["key"] not in (stored.digest, stored.prefix)
    assert created["key"].startswith(stored.prefix)
    listed = api.get("/api/v1/keys").json()
    assert all("key" not in item for item in listed)
    assert {"laptop", "tests"} == {item["name"] for item in listed}


def test_a_revoked_key_is_refused(buyer: Any) -> None:
    from marketplace.accounts.services import api_key_create

    created = api_key_create(user=buyer, name="temporary")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.plaintext}")
    assert client.get("/api/v1/jobs").status_code == 200
    assert client.post(f"/api/v1/keys/{created.api_key.pk}/revoke").json()["revoked_at"] is not None
    assert client.get("/api/v1/jobs").status_code == 401


def test_a_key_needs_a_name(api: APIClient) -> None:
    response = api.post("/api/v1/keys", {"name": "  "}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_signup_names_the_field_that_is_wrong() -> None:
    client = APIClient()
    assert (
        "email"
        in client.post("/api/v1/auth/signup", {"email": "nope", "password": "x" * 12}, format="json").json()
    )
    weak = client.post("/api/v1/auth/signup", {"email": "a@b.co", "password": "short"}, format="json")
    assert weak.status_code == 400 and "password" in weak.json()
    client.post("/api/v1/auth/signup", {"email": "dup@b.co", "password": "long-enough-pw"}, format="json")
    dup = client.post(
        "/api/v1/auth/signup", {"email": "DUP@b.co", "password": "long-enough-pw"}, format="json"
    )
    assert dup.status_code == 400 and "already exists" in dup.json()["email"][0]


def test_another_users_key_cannot_be_revoked(api: APIClient, other_buyer: Any) -> None:
    from marketplace.accounts.services import api_key_create

    theirs = api_key_create(user=other_buyer, name="theirs").api_key
    assert api.post(f"/api/v1/keys/{theirs.pk}/revoke").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
