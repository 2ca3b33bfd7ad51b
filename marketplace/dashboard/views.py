"""Server-rendered pages for buyers, GPU owners and the public market.

Views are thin: parse a form, call one service, redirect (so a reload never re-submits);
page data comes from marketplace.dashboard.selectors. Live parts refresh themselves
(static/hearth.js): the job page over a websocket, lists by re-fetching their own section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from pydantic import ValidationError as PydanticValidationError

from marketplace.accounts.models import User
from marketplace.accounts.selectors import api_key_list_for_user
from marketplace.accounts.services import api_key_create, api_key_revoke, user_signup
from marketplace.billing.errors import InsufficientCredit, StripeUnavailable
from marketplace.billing.models import ConnectAccount
from marketplace.billing.selectors import payout_list_for_owner, topup_list_for_user, usage_by_month
from marketplace.billing.services import (
    check_topup_amount,
    connect_account_sync,
    connect_onboarding_start,
    topup_create,
    topup_sync,
)
from marketplace.catalog.selectors import catalog_model_get_by_name
from marketplace.config.api_errors import pydantic_errors_by_field
from marketplace.dashboard import charts, selectors
from marketplace.dashboard.forms import (
    ApiKeyForm,
    NewJobForm,
    PolicyForm,
    SignupForm,
    TopUpForm,
    form_errors_from,
)
from marketplace.hosts.services import (
    enrollment_token_create,
    host_policy,
    host_policy_update,
    host_token_revoke,
)
from marketplace.jobs.inputs import inputs_from_jsonl
from marketplace.jobs.selectors import job_get_for_buyer, job_results_jsonl
from marketplace.jobs.services import JobTooLarge, check_job_spec, job_cancel, job_submit
from marketplace.jobs.states import JOB_FINISHED, JobStatus
from marketplace.trust.selectors import host_reliability

logger = logging.getLogger(__name__)

# What the page keeps in the session to show exactly once after a redirect.
FLASH_API_KEY = "dashboard.new_api_key"
FLASH_ENROLLMENT = "dashboard.new_enrollment_token"

METER_TITLES = {
    "gpu_w": ("GPU power", "W"),
    "battery_soc_pct": ("Battery charge", "%"),
    "solar_w": ("Solar", "W"),
    "grid_w": ("Grid (import +, export -)", "W"),
    "load_w": ("Home load", "W"),
}


def _user(request: HttpRequest) -> User:
    user = request.user
    assert isinstance(user, User)
    return user


def _owned_job(request: HttpRequest, job_id: str) -> Any:
    job = job_get_for_buyer(buyer=_user(request), job_id=job_id)
    if job is None:
        raise Http404("no such job")
    return job


def _owned_machine(request: HttpRequest, host_id: str) -> Any:
    host = selectors.machine_get_for_owner(owner=_user(request), host_id=host_id)
    if host is None:
        raise Http404("no such machine")
    return host


def _unit_format(unit: str) -> Callable[[float], str]:
    return lambda value: f"{value:.0f} {unit}"


def _money(value: float) -> str:
    return selectors.money(round(value))


# ---- public ----------------------------------------------------------------------


def market(request: HttpRequest) -> HttpResponse:
    return render(request, "market.html", {"market": selectors.market_snapshot()})


def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None, initial={"role": User.Role.BUYER})
    if request.method == "POST" and form.is_valid():
        try:
            user = user_signup(**form.cleaned_data)
        except ValidationError as exc:
            form_errors_from(form, exc)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("dashboard")
    return render(request, "signup.html", {"form": form})


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """Where logins and Stripe's redirects land; it settles what they report, then goes to the
    user's side of the market."""
    user = _user(request)
    if request.GET.get("topup") == "success" and request.GET.get("session_id"):
        session_id = request.GET["session_id"]
        # Stripe's redirect proves nothing; topup_sync re-reads the session from Stripe itself.
        if topup_list_for_user(user=user).filter(session_id=session_id).exists():
            try:
                topup_sync(session_id=session_id)
            except Exception:
                logger.exception("top-up %s: could not sync on return from Checkout", session_id)
            messages.success(
                request, "Payment received: your credit is updated as soon as Stripe confirms it."
            )
        return redirect("billing")
    if request.GET.get("topup") == "cancelled":
        messages.info(request, "Top-up cancelled; nothing was charged.")
        return redirect("billing")
    if request.GET.get("connect") in {"done", "refresh"}:
        account = ConnectAccount.objects.filter(owner=user).first()
        if account is not None:
            try:
                connect_account_sync(stripe_account_id=account.stripe_account_id)
            except Exception:
                logger.exception("could not sync Connect account %s", account.stripe_account_id)
        return redirect("earnings")
    return redirect("machines" if user.role == User.Role.HOST else "jobs")


# ---- buyers ------------------------------------------------------------------------


@login_required
def jobs(request: HttpRequest) -> HttpResponse:
    buyer = _user(request)
    rows = selectors.job_rows_for_buyer(buyer=buyer)
    return render(
        request,
        "buyer/jobs.html",
        {
            "rows": rows,
            "balance": selectors.buyer_balance(buyer=buyer),
            "live": any(row["job"].status not in JOB_FINISHED for row in rows),
        },
    )


def _max_price_minor(form: NewJobForm) -> int | None:
    """The form's max price per 1k items (in currency units, two decimals) as minor units."""
    price = form.cleaned_data.get("max_price_per_1k")
    return None if price is None else int(price * 100)


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    buyer = _user(request)
    form = NewJobForm(request.POST or None, request.FILES or None)
    estimate = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            upload = data.get("inputs_file")
            inputs = inputs_from_jsonl(upload.read(), field="inputs_file") if upload else form.inline_inputs()
            spec = check_job_spec(
                model_name=data["model"],
                inputs=inputs,
                task_size=data.get("task_size"),
                green_only=bool(data.get("green_only")),
                verification=data.get("verification") or None,
                spot_fraction=data.get("spot_fraction"),
                replicas=data.get("replicas"),
                max_price_per_1k_minor=_max_price_minor(form),
            )
            job = job_submit(buyer=buyer, spec=spec)
        except ValidationError as exc:
            form_errors_from(form, exc, rename={"inputs": "inputs_file" if upload else "inputs_text"})
        except JobTooLarge as exc:
            form.add_error("inputs_file" if upload else "inputs_text", str(exc))
        except InsufficientCredit as exc:
            form.add_error(None, f"{exc}. Top up on the Billing page, then submit again.")
        else:
            messages.success(request, f"Job submitted: {job.items_total} items.")
            return redirect("job-detail-page", job_id=job.pk)
    if form.is_bound and hasattr(form, "cleaned_data"):
        data = form.cleaned_data
        model = catalog_model_get_by_name(name=data.get("model") or "")
        estimate = selectors.estimate_range(
            items=len(form.inline_inputs()),
            model=model,
            verification=data.get("verification") or "none",
            spot_fraction=data.get("spot_fraction"),
            replicas=data.get("replicas"),
        )
    prices = selectors.price_range_per_1k()
    return render(
        request,
        "buyer/job_new.html",
        {
            "form": form,
            "estimate": estimate,
            "prices": prices,
            "prices_text": (selectors.money(prices[0]), selectors.money(prices[1])) if prices else None,
            "balance": selectors.buyer_balance(buyer=buyer),
            "currency": settings.HEARTH_CURRENCY.upper(),
        },
    )


@login_required
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _owned_job(request, job_id)
    return render(
        request,
        "buyer/job_detail.html",
        {"job": job, "live": selectors.job_live(job=job), "ws_path": f"/ws/pages/jobs/{job.pk}/"},
    )


@login_required
def job_results(request: HttpRequest, job_id: str) -> HttpResponse | StreamingHttpResponse:
    job = _owned_job(request, job_id)
    if job.status != JobStatus.SUCCEEDED:
        return render(request, "buyer/job_not_ready.html", {"job": job}, status=409)
    response = StreamingHttpResponse(job_results_jsonl(job=job), content_type="application/x-ndjson")
    response["Content-Disposition"] = f'attachment; filename="job-{job.pk}.jsonl"'
    return response


@login_required
@require_POST
def job_cancel_view(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _owned_job(request, job_id)
    if job.status in JOB_FINISHED:
        messages.info(request, f"The job had already {job.status}.")
    else:
        job_cancel(job=job)
        messages.success(request, "Job cancelled; the unused credit is released.")
    return redirect("job-detail-page", job_id=job.pk)


@login_required
def api_keys(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    form = ApiKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            created = api_key_create(user=user, name=form.cleaned_data["name"])
        except ValidationError as exc:
            form_errors_from(form, exc)
        else:
            # Shown once, on the page the redirect lands on, then gone from the session.
            request.session[FLASH_API_KEY] = {"name": created.api_key.name, "key": created.plaintext}
            return redirect("api-keys-page")
    return render(
        request,
        "buyer/api_keys.html",
        {
            "form": form,
            "keys": api_key_list_for_user(user=user),
            "new_key": request.session.pop(FLASH_API_KEY, None),
        },
    )


@login_required
@require_POST
def api_key_revoke_view(request: HttpRequest, key_id: int) -> HttpResponse:
    key = api_key_list_for_user(user=_user(request)).filter(pk=key_id).first()
    if key is None:
        raise Http404("no such key")
    api_key_revoke(api_key=key)
    messages.success(request, f"Key “{key.name}” revoked; requests with it are refused from now on.")
    return redirect("api-keys-page")


@login_required
def billing(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    form = TopUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            topup = topup_create(user=user, amount_minor=check_topup_amount(form.amount_minor()))
        except ValidationError as exc:
            form_errors_from(form, exc, rename={"amount_minor": "amount"})
        except StripeUnavailable as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(topup.checkout_url)
    spend = selectors.spend_by_day(buyer=user)
    return render(
        request,
        "buyer/billing.html",
        {
            "form": form,
            "balance": selectors.buyer_balance(buyer=user),
            "topups": topup_list_for_user(user=user)[:20],
            "months": usage_by_month(buyer=user),
            "spend_chart": charts.bar_chart(spend, title="Spend per day, last 30 days", fmt=_money),
        },
    )


# ---- hosts -------------------------------------------------------------------------


@login_required
def machines(request: HttpRequest) -> HttpResponse:
    return render(
        request, "host/machines.html", {"rows": selectors.machine_rows_for_owner(owner=_user(request))}
    )


@login_required
def machine_add(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        created = enrollment_token_create(owner=_user(request))
        request.session[FLASH_ENROLLMENT] = {
            "token": created.plaintext,
            "expires_at": created.token.expires_at.strftime("%Y-%m-%d %H:%M"),
        }
        return redirect("machine-add")
    new = request.session.pop(FLASH_ENROLLMENT, None)
    server = request.build_absolute_uri("/").rstrip("/")
    return render(
        request,
        "host/machine_add.html",
        {
            "new": new,
            "server": server,
            "command": f"curl -fsSL {server}/install.sh | sh -s -- {new['token']}" if new else "",
        },
    )


@login_required
def machine_detail(request: HttpRequest, host_id: str) -> HttpResponse:
    host = _owned_machine(request, host_id)
    policy = host_policy(host=host)
    form = PolicyForm(request.POST or None, initial=PolicyForm.initial_from(policy))
    if request.method == "POST" and form.is_valid():
        try:
            policy = host_policy_update(host=host, changes=form.changes())
        except PydanticValidationError as exc:
            names = {"price_per_1k_items_minor": "price_per_1k"}
            for field, errors in pydantic_errors_by_field(exc).items():
                for message in errors:
                    target = names.get(field, field)
                    form.add_error(target if target in form.fields else None, message)
        else:
            messages.success(request, f"Policy version {policy.version} saved and sent to the machine.")
            return redirect("machine-detail", host_id=host.pk)
    power = selectors.machine_power_series(host=host)
    power_charts = [
        charts.line_chart(
            points,
            title=METER_TITLES[meter][0],
            fmt=_unit_format(METER_TITLES[meter][1]),
            top=100.0 if meter == "battery_soc_pct" else None,
        )
        for meter, points in power.items()
    ]
    tasks_chart = charts.bar_chart(
        selectors.machine_tasks_per_hour(host=host),
        title="Tasks per hour, last 24 h",
        fmt=lambda v: f"{v:.0f}",
    )
    return render(
        request,
        "host/machine_detail.html",
        {
            "host": host,
            "form": form,
            "policy": policy,
            "reliability": host_reliability(host=host, events=20),
            "power_charts": power_charts,
            "tasks_chart": tasks_chart,
            "earnings_chart": charts.bar_chart(
                selectors.machine_earnings_by_day(host=host), title="Earned per day, last 14 days", fmt=_money
            ),
            "current": selectors.machine_current_tasks(host=host),
        },
    )


@login_required
@require_POST
def machine_revoke(request: HttpRequest, host_id: str) -> HttpResponse:
    host = _owned_machine(request, host_id)
    host_token_revoke(host=host)
    messages.success(request, f"{host.name} is removed: its token is revoked and its connection closed.")
    return redirect("machines")


@login_required
def earnings(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    overview = selectors.earnings_overview(owner=user)
    return render(
        request,
        "host/earnings.html",
        {
            "overview": overview,
            "chart": charts.bar_chart(overview["chart"], title="Earned per day, last 30 days", fmt=_money),
            "payouts": payout_list_for_owner(owner=user)[:50],
            "connect": ConnectAccount.objects.filter(owner=user).first(),
            "can_connect": user.role == User.Role.HOST,
        },
    )


@login_required
@require_POST
def connect_start(request: HttpRequest) -> HttpResponse:
    user = _user(request)
    if user.role != User.Role.HOST:
        messages.error(request, "Only GPU owners receive payouts.")
        return redirect("earnings")
    try:
        _account, url = connect_onboarding_start(owner=user)
    except StripeUnavailable as exc:
        messages.error(request, str(exc))
        return redirect("earnings")
    return redirect(url)
