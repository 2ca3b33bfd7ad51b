"""A buyer signs up, tops up through (fake) Stripe Checkout, submits a job from the form, watches
its progress bar reach 100 % without reloading, and downloads the results."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from marketplace.billing.fake_stripe import FakeStripe
from marketplace.devstack import LocalStack

from .conftest import agent_stop, deliver_stripe_events, nav, screenshot, sign_up

pytestmark = pytest.mark.integration

LINES = [f"Rooftop panel {i} fed the battery while the GPU embedded sentence {i}." for i in range(40)]


def test_a_buyer_tops_up_submits_a_job_watches_it_finish_live_and_downloads_the_results(
    page: Any, stack: LocalStack, fake_stripe: FakeStripe, fleet_agent: dict[str, Any]
) -> None:
    sign_up(page, email="buyer-journey@example.com", role="buyer")
    assert "No jobs yet" in page.content()
    screenshot(page, "buyer-jobs-empty")

    # Top up: the form sends the browser to Stripe Checkout (the fake's pay page pays at once
    # and sends the browser back to the success URL, where the server asks Stripe for the
    # session rather than trusting the redirect). Stripe's webhook arriving afterwards
    # credits nothing twice.
    nav(page, "Billing")
    page.get_by_label("Amount (USD)").fill("20.00")
    page.get_by_role("button", name="Pay with Stripe").click()
    page.wait_for_url("**/billing/")
    deliver_stripe_events(stack, fake_stripe, "checkout.session.completed")
    page.reload()
    assert page.locator("[data-stat=credit]").inner_text() == "20.00 USD"
    screenshot(page, "buyer-billing")

    # A job of 10 tasks while no agent is online: the page opens on 0 %.
    nav(page, "New job")
    page.get_by_label("Inputs, one per line").fill("\n".join(LINES))
    page.get_by_label("Items per task").fill("4")
    # Priced from the verified host's asking price (10 ¢ per 1k items by default), before submitting.
    assert (
        page.locator("#estimate").inner_text() == "Estimated price for 40 items: 0.0040 USD \u2013 0.0040 USD"
    )
    screenshot(page, "buyer-new-job")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}/$"))
    job_url = page.url
    assert page.locator("[data-live-field=percent]").inner_text() == "0"
    page.evaluate(
        """() => {
            window.__sameDocument = true;
            window.__seen = [];
            const percent = document.querySelector('[data-live-field=percent]');
            new MutationObserver(() => window.__seen.push(Number(percent.textContent)))
                .observe(percent, {childList: true, characterData: true, subtree: true});
        }"""
    )
    screenshot(page, "buyer-job-queued")

    agent = stack.start_agent(name=fleet_agent["name"], home=fleet_agent["home"])
    try:
        page.locator("[data-live-field=percent]").filter(has_text=re.compile(r"^100$")).wait_for(
            timeout=120_000
        )
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        assert page.url == job_url
        seen = page.evaluate("window.__seen")
        assert seen[-1] == 100
        assert seen == sorted(seen), f"progress went backwards: {seen}"
        assert page.locator("[data-live-field=status]").inner_text() == "succeeded"
        assert page.locator(".timeline li.succeeded").count() == 10
        screenshot(page, "buyer-job-done")

        with page.expect_download() as download_info:
            page.get_by_role("link", name="Download results (JSONL)").click()
        rows = [json.loads(line) for line in download_info.value.path().read_text().splitlines()]
    finally:
        agent_stop(stack, agent, owner=fleet_agent["owner"])
    assert [row["index"] for row in rows] == list(range(len(LINES)))
    assert all(len(row["embedding"]) == 384 for row in rows)

    nav(page, "Jobs")
    assert page.locator("td .status.succeeded").count() == 1
    assert "40 / 40" in page.content()
    screenshot(page, "buyer-jobs")
