"""The public market updates itself and fits a phone; a forgotten password is reset through the
emailed link (the console email backend writes it to the server's log)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from marketplace.devstack import LocalStack

from .conftest import agent_stop, screenshot, sign_up, wait_for

pytestmark = pytest.mark.integration


def test_the_market_counts_a_machine_coming_online_without_a_reload_at_phone_width(
    browser: Any, stack: LocalStack, fleet_agent: dict[str, Any]
) -> None:
    context = browser.new_context(base_url=stack.url, viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto("/market/")
        before = int(page.locator("[data-stat=hosts-online]").inner_text())
        page.evaluate("window.__sameDocument = true")
        agent = stack.start_agent(name=fleet_agent["name"], home=fleet_agent["home"])
        try:
            page.locator("[data-stat=hosts-online]").filter(has_text=str(before + 1)).wait_for(timeout=40_000)
        finally:
            agent_stop(stack, agent, owner=fleet_agent["owner"])
        assert page.evaluate("window.__sameDocument") is True
        wider = page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                .filter((e) => e.getBoundingClientRect().right > 390 && !e.closest('.scroll'))
                .map((e) => e.tagName + '.' + e.className)"""
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, f"wider than a phone: {wider}"
        assert "all-MiniLM-L6-v2" in page.locator("#market").inner_text()
        screenshot(page, "market-phone")
    finally:
        context.close()


def test_a_forgotten_password_is_reset_through_the_emailed_link(page: Any, stack: LocalStack) -> None:
    sign_up(page, email="forgetful@example.com", role="buyer")
    page.get_by_role("button", name="Log out").click()
    page.goto("/login/")
    page.get_by_role("link", name="Forgot your password?").click()
    page.get_by_label("Email").fill("forgetful@example.com")
    page.get_by_role("button", name="Send the link").click()
    page.wait_for_url("**/password-reset/sent/")

    log = stack.workdir / "server.log"
    link = wait_for(
        lambda: re.search(rf"{re.escape(stack.url)}(/reset/\S+/)", log.read_text(errors="replace")),
        timeout=10,
        what="no reset link in the server's console",
    )
    page.goto(link.group(1))
    page.get_by_label("New password", exact=True).fill("a-brand-new-passphrase")
    page.get_by_label("New password confirmation").fill("a-brand-new-passphrase")
    page.get_by_role("button", name="Set password").click()
    page.wait_for_url("**/reset/done/")

    page.goto("/login/")
    page.get_by_label("Email").fill("forgetful@example.com")
    page.get_by_label("Password").fill("a-brand-new-passphrase")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/jobs/")
