"""The first pages: sign up through the form, land on a dashboard that lists only your jobs."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_signing_up_through_the_form_logs_in_and_shows_the_dashboard(
    catalog: Any, other_api: APIClient
) -> None:
    other_api.post("/api/v1/jobs", {"model": "all-MiniLM-L6-v2", "inputs": ["not yours"]}, format="json")
    browser = Client()
    response = browser.post(
        "/signup/",
        {"email": "grace@example.com", "password": "a-long-passphrase", "role": "buyer"},
        follow=True,
    )
    assert response.redirect_chain[-1][0] == "/dashboard/"
    page = response.content.decode()
    assert "No jobs yet" in page
    assert "not yours" not in page


def test_the_signup_form_shows_errors_next_to_the_field(buyer: Any) -> None:
    taken = Client().post(
        "/signup/", {"email": buyer.email, "password": "a-long-passphrase", "role": "buyer"}
    )
    assert taken.status_code == 200
    assert "already exists" in taken.context["form"].errors["email"][0]
    weak = Client().post("/signup/", {"email": "new@example.com", "password": "short", "role": "buyer"})
    assert "at least 8 characters" in weak.context["form"].errors["password"][0]
    assert 'class="errorlist"' in weak.content.decode()


def test_the_dashboard_needs_a_login() -> None:
    response = Client().get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_the_dashboard_lists_the_buyers_jobs_and_machines(
    api: APIClient, buyer: Any, catalog: Any, host: Any
) -> None:
    job_id = api.post(
        "/api/v1/jobs", {"model": "all-MiniLM-L6-v2", "inputs": ["a", "b"]}, format="json"
    ).json()["id"]
    browser = Client()
    browser.force_login(buyer)
    page = browser.get("/dashboard/").content.decode()
    assert job_id in page
    assert "0 / 2" in page
