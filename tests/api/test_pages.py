"""The pages through Django's test client: who sees what, forms' errors beside their fields,
and that every page renders for the side of the market it belongs to."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from rest_framework.test import APIClient

from marketplace.accounts.models import ApiKey
from marketplace.dashboard.selectors import money
from marketplace.hosts.models import EnrollmentToken
from marketplace.jobs.models import Job
from tests.conftest import TEST_CREDIT_MINOR

pytestmark = pytest.mark.django_db


def _logged_in(user: Any) -> Client:
    browser = Client()
    browser.force_login(user)
    return browser


def _submit(api: APIClient, inputs: list[str]) -> str:
    response = api.post("/api/v1/jobs", {"model": "all-MiniLM-L6-v2", "inputs": inputs}, format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def test_signing_up_as_a_buyer_logs_in_and_lands_on_an_empty_jobs_page(
    catalog: Any, other_api: APIClient
) -> None:
    _submit(other_api, ["not yours"])
    response = Client().post(
        "/signup/",
        {"email": "grace@example.com", "password": "a-long-passphrase", "role": "buyer"},
        follow=True,
    )
    assert [url for url, _ in response.redirect_chain] == ["/dashboard/", "/jobs/"]
    page = response.content.decode()
    assert "No jobs yet" in page
    assert "not yours" not in page


def test_signing_up_as_a_gpu_owner_lands_on_the_machines_page() -> None:
    response = Client().post(
        "/signup/", {"email": "ada@example.com", "password": "a-long-passphrase", "role": "host"}, follow=True
    )
    assert response.redirect_chain[-1][0] == "/machines/"
    assert "No machines yet" in response.content.decode()


def test_the_signup_form_shows_errors_next_to_the_field(buyer: Any) -> None:
    taken = Client().post(
        "/signup/", {"email": buyer.email, "password": "a-long-passphrase", "role": "buyer"}
    )
    assert taken.status_code == 200
    assert "already exists" in taken.context["form"].errors["email"][0]
    weak = Client().post("/signup/", {"email": "new@example.com", "password": "short", "role": "buyer"})
    assert "at least 8 characters" in weak.context["form"].errors["password"][0]
    page = weak.content.decode()
    assert re.search(r'id="id_password".*?<ul class="errorlist" id="id_password_errors"', page, re.S)


@pytest.mark.parametrize("path", ["/dashboard/", "/jobs/", "/jobs/new/", "/billing/", "/keys/", "/machines/"])
def test_private_pages_send_a_visitor_to_the_login_page(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith(f"/login/?next={path}")


def test_the_market_page_is_public_and_counts_the_hosts_online(catalog: Any, host: Any) -> None:
    host.status = "online"
    host.save()
    page = Client().get("/").content.decode()
    assert re.search(r'data-stat="hosts-online">1<', page)
    assert "all-MiniLM-L6-v2" in page


def test_the_jobs_page_lists_the_buyers_jobs_with_progress(api: APIClient, buyer: Any, catalog: Any) -> None:
    job_id = _submit(api, ["a", "b"])
    page = _logged_in(buyer).get("/jobs/").content.decode()
    assert job_id in page
    assert "0 / 2" in page


def test_a_buyer_opening_another_buyers_job_page_gets_404(
    other_api: APIClient, buyer: Any, catalog: Any
) -> None:
    job_id = _submit(other_api, ["theirs"])
    browser = _logged_in(buyer)
    assert browser.get(f"/jobs/{job_id}/").status_code == 404
    assert browser.get(f"/jobs/{job_id}/results.jsonl").status_code == 404
    assert browser.post(f"/jobs/{job_id}/cancel/").status_code == 404
    assert Job.objects.get(pk=job_id).status == "queued"


def test_submitting_pasted_lines_creates_the_job_and_redirects_to_its_page(buyer: Any, catalog: Any) -> None:
    response = _logged_in(buyer).post(
        "/jobs/new/",
        {"model": "all-MiniLM-L6-v2", "inputs_text": "first line\n\nsecond line\n", "verification": "none"},
    )
    job = Job.objects.get(buyer=buyer)
    assert response.status_code == 302
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert job.items_total == 2


def test_the_new_job_form_puts_each_error_beside_its_field(buyer: Any, catalog: Any) -> None:
    browser = _logged_in(buyer)
    empty = browser.post("/jobs/new/", {"model": "all-MiniLM-L6-v2", "verification": "none"})
    assert "paste at least one line" in empty.context["form"].errors["inputs_text"][0]
    bad = browser.post(
        "/jobs/new/",
        {"model": "all-MiniLM-L6-v2", "inputs_text": "x", "verification": "redundant", "replicas": "9"},
    )
    assert "replicas must be an integer from 2 to 5" in bad.context["form"].errors["replicas"][0]
    assert 'id="id_replicas_errors"' in bad.content.decode()
    assert not Job.objects.exists()


def test_a_jsonl_upload_with_a_bad_line_names_the_line(buyer: Any, catalog: Any) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("inputs.jsonl", b'"fine"\n{"text": 3}\n', content_type="application/x-ndjson")
    response = _logged_in(buyer).post(
        "/jobs/new/", {"model": "all-MiniLM-L6-v2", "verification": "none", "inputs_file": upload}
    )
    assert "line 2" in response.context["form"].errors["inputs_file"][0]


def test_a_new_api_key_is_shown_once_and_can_be_revoked(buyer: Any) -> None:
    browser = _logged_in(buyer)
    first = browser.post("/keys/", {"name": "laptop"}, follow=True).content.decode()
    shown = re.search(r'<code id="new-key">(hk_[^<]+)</code>', first)
    assert shown is not None
    assert shown.group(1) not in browser.get("/keys/").content.decode()
    key = ApiKey.objects.get(user=buyer)
    browser.post(f"/keys/{key.pk}/revoke/")
    key.refresh_from_db()
    assert key.revoked_at is not None
    with_key = APIClient(HTTP_AUTHORIZATION=f"Bearer {shown.group(1)}")
    assert with_key.get("/api/v1/jobs").status_code == 401


def test_a_top_up_below_the_minimum_is_refused_beside_the_amount(buyer: Any) -> None:
    response = _logged_in(buyer).post("/billing/", {"amount": "0.10"})
    assert response.status_code == 200
    assert "amount_minor must be between" in response.context["form"].errors["amount"][0]


def test_adding_a_machine_shows_the_one_line_install_command_once(host_owner: Any) -> None:
    browser = _logged_in(host_owner)
    page = browser.post("/machines/add/", follow=True).content.decode()
    command = re.search(
        r'<code id="install-command">curl -fsSL http://testserver/install.sh \| sh -s -- (he_\S+)</code>',
        page,
    )
    assert command is not None
    assert EnrollmentToken.objects.filter(owner=host_owner).count() == 1
    assert command.group(1) not in browser.get("/machines/add/").content.decode()


def test_the_policy_form_saves_a_new_version_and_refuses_bad_hours(host_owner: Any, host: Any) -> None:
    browser = _logged_in(host_owner)
    fields = {"battery_reserve_pct": "35", "allowed_hours": "9-11,17", "price_per_1k": "0.20"}
    assert browser.post(f"/machines/{host.pk}/", fields).status_code == 302
    host.refresh_from_db()
    assert host.policy["battery_reserve_pct"] == 35
    assert host.policy["allowed_hours"] == [9, 10, 11, 17]
    assert host.policy["price_per_1k_items_minor"] == 20
    assert host.policy["version"] == 1
    bad = browser.post(f"/machines/{host.pk}/", {**fields, "allowed_hours": "22-25"})
    assert "hours run from 0 to 23" in bad.context["form"].errors["allowed_hours"][0]
    host.refresh_from_db()
    assert host.policy["version"] == 1


def test_removing_a_machine_revokes_its_token_and_drops_it_from_the_list(host_owner: Any, host: Any) -> None:
    browser = _logged_in(host_owner)
    assert browser.post(f"/machines/{host.pk}/revoke/")["Location"] == "/machines/"
    host.refresh_from_db()
    assert host.revoked_at is not None
    assert "No machines yet" in browser.get("/machines/").content.decode()
    assert browser.get(f"/machines/{host.pk}/").status_code == 404


def test_another_owners_machine_page_is_404(buyer: Any, host: Any) -> None:
    browser = _logged_in(buyer)
    assert browser.get(f"/machines/{host.pk}/").status_code == 404
    assert browser.post(f"/machines/{host.pk}/revoke/").status_code == 404
    host.refresh_from_db()
    assert host.revoked_at is None


def test_password_reset_sends_a_link_that_sets_a_new_password(buyer: Any, settings: Any) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    Client().post("/password-reset/", {"email": buyer.email})
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/reset/\S+/)", str(mail.outbox[0].body))
    assert link is not None
    browser = Client()
    form_url = browser.get(link.group(1), follow=True).redirect_chain[-1][0]
    done = browser.post(form_url, {"new_password1": "another-long-one", "new_password2": "another-long-one"})
    assert done["Location"] == "/reset/done/"
    assert Client().login(username=buyer.username, password="another-long-one")


def test_every_page_renders_for_its_side_of_the_market(
    buyer: Any, host_owner: Any, host: Any, catalog: Any
) -> None:
    for path in ["/jobs/", "/jobs/new/", "/billing/", "/keys/"]:
        assert _logged_in(buyer).get(path).status_code == 200, path
    for path in ["/machines/", "/machines/add/", f"/machines/{host.pk}/", "/earnings/"]:
        assert _logged_in(host_owner).get(path).status_code == 200, path
    assert Client().get("/static/hearth.js").status_code == 200


def test_the_machine_page_charts_each_meter_the_site_reports(host_owner: Any, host: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from marketplace.hosts.models import PowerSample

    start = timezone.now().replace(second=0, microsecond=0)
    for minutes, soc in ((2, 44.0), (1, 45.0)):
        PowerSample.objects.create(
            host=host,
            resolution_s=60,
            bucket_start=start - timedelta(minutes=minutes),
            samples=2,
            battery_soc_pct_sum=2 * soc,
            battery_soc_pct_n=2,
        )
    page = _logged_in(host_owner).get(f"/machines/{host.pk}/").content.decode()
    assert '<svg class="chart"' in page
    assert 'aria-label="Battery charge: 45 % now"' in page
    assert "GPU power:" not in page  # a meter the site never reported gets no empty chart


def test_the_billing_page_shows_credit_from_stripe_and_the_spend_per_day(
    api: APIClient, buyer: Any, host_owner: Any, host: Any, catalog: Any, settings: Any
) -> None:
    from marketplace.billing.fake_stripe import FakeStripe
    from marketplace.billing.services import escrow_capture, topup_create

    fake = FakeStripe().start()
    try:
        settings.HEARTH_STRIPE_API_KEY = "sk_test_pages"
        settings.HEARTH_STRIPE_API_BASE = fake.api_base
        settings.HEARTH_STRIPE_MAX_NETWORK_RETRIES = 0
        topup = topup_create(user=buyer, amount_minor=1000)
        assert topup.session_id is not None
        fake.pay_session(topup.session_id)
        browser = _logged_in(buyer)
        # Back from Checkout: the page asks Stripe itself instead of trusting the redirect.
        landed = browser.get(f"/dashboard/?topup=success&session_id={topup.session_id}")
        assert landed["Location"] == "/billing/"
    finally:
        fake.stop()
    # Five items at 100.00 USD per 1k hold 0.50 USD of escrow at submit.
    response = api.post(
        "/api/v1/jobs",
        {"model": "all-MiniLM-L6-v2", "inputs": list("abcde"), "max_price_per_1k_minor": 100_000},
        format="json",
    )
    assert response.status_code == 201, response.content
    job_id = str(response.json()["id"])
    escrow_capture(
        run_id="run-1", job_id=job_id, buyer=buyer, host_owner=host_owner, host_id=host.pk, amount_minor=250
    )
    page = browser.get("/billing/").content.decode()
    # The test credit, plus the top-up, less the escrow held.
    assert f'data-stat="credit">{money(TEST_CREDIT_MINOR + 1000 - 500)}<' in page
    assert 'aria-label="Spend per day, last 30 days: 2.50 USD in all"' in page
    assert "2.50 USD" in browser.get("/jobs/").content.decode()  # the job's cost
    machine = _logged_in(host_owner).get(f"/machines/{host.pk}/").content.decode()
    assert 'aria-label="Earned per day, last 14 days: 2.13 USD in all"' in machine  # 250 less the 15% fee
