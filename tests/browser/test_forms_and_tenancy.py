"""Bad input is answered beside the field it concerns, and one buyer cannot open another's job,
by page or by websocket."""

from __future__ import annotations

from typing import Any

import pytest

from marketplace.devstack import LocalStack

from .conftest import nav, screenshot, sign_up

pytestmark = pytest.mark.integration


def _error_beside(page: Any, field_id: str) -> str:
    """The error text in the same form row as the input, which the browser marks invalid."""
    row = page.locator(f".field:has(#{field_id})")
    assert page.locator(f"#{field_id}").get_attribute("aria-invalid") == "true"
    return str(row.locator(".errorlist").inner_text())


def test_bad_input_is_answered_beside_the_field_and_nothing_is_created(page: Any, stack: LocalStack) -> None:
    page.goto("/signup/")
    page.get_by_label("Email").fill("not-an-email")
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()
    assert "valid email" in _error_beside(page, "id_email")
    assert "at least 8 characters" in _error_beside(page, "id_password")
    screenshot(page, "form-errors-signup")

    sign_up(page, email="careless-buyer@example.com", role="buyer")
    nav(page, "New job")
    page.get_by_role("button", name="Submit job").click()
    assert "paste at least one line" in _error_beside(page, "id_inputs_text")
    page.get_by_label("Inputs, one per line").fill("one\ntwo")
    page.get_by_label("Verification", exact=True).select_option("redundant")
    page.get_by_label("Runs per task").fill("9")
    page.get_by_role("button", name="Submit job").click()
    assert "replicas must be an integer from 2 to 5" in _error_beside(page, "id_replicas")
    assert page.get_by_label("Inputs, one per line").input_value() == "one\ntwo"  # nothing typed is lost
    screenshot(page, "form-errors-new-job")

    nav(page, "Billing")
    page.get_by_label("Amount (USD)").fill("0.10")
    page.get_by_role("button", name="Pay with Stripe").click()
    assert "between" in _error_beside(page, "id_amount")

    nav(page, "Jobs")
    assert "No jobs yet" in page.content()

    # The same pages at phone width: nothing but tables scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/jobs/new/", "/billing/", "/keys/"):
        page.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
    screenshot(page, "api-keys-phone")


def test_a_buyer_opening_another_buyers_job_gets_404_and_no_live_feed(page: Any, stack: LocalStack) -> None:
    owner_key = stack.buyer("job-owner@example.com")
    with stack.client(headers={"Authorization": f"Bearer {owner_key}"}) as http:
        created = http.post("/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": ["private text"]})
        assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    sign_up(page, email="nosy-buyer@example.com", role="buyer")
    response = page.goto(f"/jobs/{job_id}/")
    assert response is not None and response.status == 404
    assert "private text" not in page.content()
    assert page.goto(f"/jobs/{job_id}/results.jsonl").status == 404
    page.goto("/jobs/")
    close_code = page.evaluate(
        """(path) => new Promise((resolve) => {
            const socket = new WebSocket(`ws://${location.host}${path}`);
            socket.onmessage = () => resolve("got a message");
            socket.onclose = (event) => resolve(event.code);
        })""",
        f"/ws/pages/jobs/{job_id}/",
    )
    assert close_code == 4404
