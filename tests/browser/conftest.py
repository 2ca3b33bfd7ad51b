"""Browser tests: Playwright drives Debian's headless Chromium against a real Hearth.

One stack (uvicorn, the local fake Stripe, real agent processes) serves every test here; it is
package-scoped, so it stops before the rest of the suite runs.
Screenshots of key pages go to var/test-artifacts/browser/NAME.png.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from marketplace.billing.fake_stripe import FakeStripe
from marketplace.devstack import ROOT, AgentProcess, LocalStack, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "browser"
WEBHOOK_SECRET = "whsec_browser_tests"

# A sunny noon on a home with a half-full battery: the agent reads it every half second.
SUNNY_SITE = {
    "soc_pct": 45, "solar_peak_w": 3000, "start_hour": 12, "load_w": 400,
    "load_noise_w": 0, "seed": 2,
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(
        reason=f"{CHROMIUM} is absent: install Debian's chromium (scripts/services.sh start)"
    )
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="package")
def stack_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def fake_stripe(stack_port: int) -> Iterator[FakeStripe]:
    """Stripe as the browser meets it; it delivers its signed webhooks to the stack, as Stripe does."""
    fake = FakeStripe(
        webhook_url=f"http://127.0.0.1:{stack_port}/api/v1/billing/stripe/webhook",
        webhook_secret=WEBHOOK_SECRET,
    ).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="package")
def stack(
    tmp_path_factory: pytest.TempPathFactory, stack_port: int, fake_stripe: FakeStripe, agent_cache: Path
) -> Iterator[LocalStack]:
    from tests.integration.conftest import TEST_SETTINGS

    stack = LocalStack(
        workdir=tmp_path_factory.mktemp("browser-stack"),
        port=stack_port,
        agent_cache=agent_cache,
        settings_env={
            **TEST_SETTINGS,
            "HEARTH_POWER_INTERVAL_S": "0.5",
            "HEARTH_STRIPE_API_KEY": "sk_test_browser",
            "HEARTH_STRIPE_API_BASE": fake_stripe.api_base,
            "HEARTH_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "HEARTH_STRIPE_MAX_NETWORK_RETRIES": "0",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if os.environ.get("HEARTH_KEEP_STACK_LOGS"):
            print(stack.logs())


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, stack: LocalStack) -> Iterator[Any]:
    """A fresh browser profile (no cookies) on a laptop-sized window."""
    context = browser.new_context(
        base_url=stack.url, viewport={"width": 1200, "height": 900}, accept_downloads=True
    )
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_up(page: Any, *, email: str, role: str, password: str = "correct-horse-battery") -> None:
    page.goto("/signup/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_label("GPU owner" if role == "host" else "Buyer").check()
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url("**/machines/" if role == "host" else "**/jobs/")


def deliver_stripe_events(stack: LocalStack, fake: FakeStripe, event_type: str) -> None:
    """What Stripe does after a payment: POST the signed events to the webhook."""
    for event in [e for e in fake.events if e["type"] == event_type]:
        payload, signature = fake.signed(event, WEBHOOK_SECRET)
        response = httpx.post(
            f"{stack.url}/api/v1/billing/stripe/webhook",
            content=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.text


def wait_for(predicate: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def policy_file(home: Path) -> dict[str, Any]:
    path = home / "energy-policy.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="package")
def fleet_agent(stack: LocalStack) -> dict[str, Any]:
    """One verified agent of another owner, stopped: a test starts it when it wants work done."""
    owner = stack.signup(email="fleet-owner@example.com", role="host")
    home = stack.enroll_agent(name="fleet-1", token=stack.enrollment_token(owner=owner))
    agent: AgentProcess = stack.start_agent(name="fleet-1", home=home)
    stack.wait_hosts_ready(owner=owner, count=1)
    agent_stop(stack, agent, owner=owner)
    return {"owner": owner, "home": home, "name": "fleet-1"}


def nav(page: Any, name: str) -> None:
    """Follow a link of the main navigation, as a person does between pages."""
    page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()


def agent_stop(stack: LocalStack, agent: AgentProcess, *, owner: tuple[str, str]) -> None:
    """Stop the agent and wait until the server has it offline, so the next test counts right."""
    agent.stop()
    with stack.client(auth=owner) as http:
        wait_for(
            lambda: all(h["status"] == "offline" for h in http.get("/api/v1/hosts").json()),
            timeout=15,
            what="the stopped agent still shows online",
        )
