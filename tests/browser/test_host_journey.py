"""A GPU owner signs up by keyboard, gets the one-line install command, enrolls a local agent with
its token, sees the machine come online and verified, changes the energy policy, and sees the agent
obey it.

The agent is enrolled with `hearth-agent enroll` (LocalStack.enroll_agent) and the token read from
the page, not by piping the shown command to sh: that installs a virtualenv (tests/integration/
test_one_line_install.py covers it) and is too slow for a browser suite.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from marketplace.devstack import LocalStack

from .conftest import SUNNY_SITE, agent_stop, nav, policy_file, screenshot, wait_for

pytestmark = pytest.mark.integration


def test_a_host_enrolls_a_machine_from_the_shown_command_and_the_agent_obeys_the_new_policy(
    page: Any, stack: LocalStack
) -> None:
    # Sign up by keyboard alone: type, Tab, arrow keys for the role, Enter.
    page.goto("/signup/")
    page.focus("#id_email")
    page.keyboard.type("attic-owner@example.com")
    page.keyboard.press("Tab")
    page.keyboard.type("correct-horse-battery")
    page.keyboard.press("Tab")
    page.keyboard.press("ArrowDown")  # from "Buyer" to "GPU owner"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_url("**/machines/")
    assert "No machines yet" in page.content()

    nav(page, "Add a machine")
    page.get_by_role("button", name="Create an enrollment token").click()
    command = page.locator("#install-command").inner_text()
    match = re.fullmatch(rf"curl -fsSL {re.escape(stack.url)}/install\.sh \| sh -s -- (he_\S+)", command)
    assert match is not None, command
    screenshot(page, "host-add-machine")

    home = stack.enroll_agent(name="sunny-attic", token=match.group(1))
    agent = stack.start_agent(
        name="sunny-attic",
        home=home,
        extra_args=("--site", "simulator", "--site-sim", json.dumps(SUNNY_SITE)),
    )
    try:
        # The machines list refreshes itself: no reload between "no machines" and "online, verified".
        nav(page, "Machines")
        page.evaluate("window.__sameDocument = true")
        card = page.locator('[data-machine="sunny-attic"]')
        card.locator("[data-field=status]").filter(has_text="online").wait_for(timeout=60_000)
        card.locator("[data-field=verified]").wait_for(timeout=90_000)
        assert page.evaluate("window.__sameDocument") is True
        assert "netns" in card.inner_text()
        screenshot(page, "host-machines")

        page.get_by_role("link", name="sunny-attic").click()
        page.get_by_label("Keep the battery above (%)").fill("55")
        page.get_by_label("Price per 1k items (USD)").fill("0.25")
        page.get_by_role("button", name="Save and send to the machine").click()
        assert "Policy version 1 saved" in page.locator(".messages").inner_text()

        # The agent writes what it was sent, then refuses work: its battery (45 %) is under 55 %.
        wait_for(
            lambda: policy_file(home).get("battery_reserve_pct") == 55,
            timeout=15,
            what=f"the agent never stored the new policy: {policy_file(home)}",
        )
        assert policy_file(home)["price_per_1k_items_minor"] == 25
        nav(page, "Machines")
        card.get_by_text(re.compile(r"no: battery at 4\d\.\d% is below the 55% reserve")).wait_for(
            timeout=15_000
        )
        screenshot(page, "host-machines-policy-obeyed")

        page.get_by_role("link", name="sunny-attic").click()
        assert page.locator("svg.chart").count() >= 4  # power meters and tasks per hour
        assert page.get_by_text("Why the score moved").is_visible()
        screenshot(page, "host-machine-detail")

        # Stripe Connect onboarding: off to Stripe (the fake finishes it at once and sends the
        # browser back to the account link's return URL).
        nav(page, "Earnings")
        page.get_by_role("button", name="Set up payouts with Stripe").click()
        page.wait_for_url("**/earnings/")
        assert re.search(r"Payouts go to your Stripe account acct_\w+", page.locator("main").inner_text())
        screenshot(page, "host-earnings")
        assert agent.process.poll() is None
    finally:
        agent_stop(stack, agent, owner=("attic-owner@example.com", "correct-horse-battery"))
