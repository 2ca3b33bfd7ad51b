"""The pages' forms: they parse what a person typed; the services decide what is allowed."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import PasswordResetForm
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives, get_connection
from django.template import loader

from marketplace.accounts.models import User
from marketplace.catalog.selectors import catalog_model_list
from marketplace.jobs.models import Verification

logger = logging.getLogger(__name__)


def form_errors_from(form: forms.Form, exc: ValidationError, *, rename: dict[str, str] | None = None) -> None:
    """Put a service's ValidationError (keyed by its field names) next to the form's fields."""
    rename = rename or {}
    if not hasattr(exc, "error_dict"):
        for message in exc.messages:
            form.add_error(None, message)
        return
    for field, messages in exc.message_dict.items():
        target = rename.get(field, field)
        for message in messages:
            form.add_error(target if target in form.fields else None, message)


class SignupForm(forms.Form):
    email = forms.EmailField()
    password = forms.CharField(widget=forms.PasswordInput, min_length=8)
    role = forms.ChoiceField(choices=User.Role.choices, label="I want to", widget=forms.RadioSelect)


class ConsolePasswordResetForm(PasswordResetForm):
    """Sends through the configured email backend (the server's console unless DJANGO_EMAIL_BACKEND
    names another); a mail server that fails is logged, and the page says the same either way."""

    def send_mail(
        self,
        subject_template_name: str,
        email_template_name: str,
        context: dict[str, Any],
        from_email: str | None,
        to_email: str,
        html_email_template_name: str | None = None,
    ) -> None:
        subject = "".join(loader.render_to_string(subject_template_name, context).splitlines())
        body = loader.render_to_string(email_template_name, context)
        message = EmailMultiAlternatives(subject, body, from_email, [to_email], connection=get_connection())
        try:
            message.send()
        except Exception:
            logger.exception("could not send the password reset email to %s", to_email)


class NewJobForm(forms.Form):
    model = forms.ChoiceField(choices=())
    inputs_text = forms.CharField(
        label="Inputs, one per line",
        widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        required=False,
    )
    inputs_file = forms.FileField(
        label="…or upload a JSONL file",
        required=False,
        help_text='one JSON string or {"text": "…"} per line',
    )
    task_size = forms.IntegerField(
        label="Items per task", required=False, min_value=1, help_text="how many items one host runs at once"
    )
    verification = forms.ChoiceField(choices=Verification.choices, initial=Verification.NONE)
    spot_fraction = forms.FloatField(
        label="Spot-check fraction", required=False, help_text="for spot checks: share of tasks re-run"
    )
    replicas = forms.IntegerField(label="Runs per task", required=False, help_text="for redundant: 2 to 5")
    green_only = forms.BooleanField(label="Run only on solar/battery power", required=False)
    max_price_per_1k = forms.DecimalField(
        label="Max price per 1k items",
        required=False,
        min_value=Decimal("0"),
        decimal_places=2,
        help_text=f"in {settings.HEARTH_CURRENCY.upper()}; hosts asking more are skipped",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = [m.name for m in catalog_model_list()]
        model_field = self.fields["model"]
        assert isinstance(model_field, forms.ChoiceField)
        model_field.choices = [(n, n) for n in names]
        if names:
            self.fields["model"].initial = names[0]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        text, upload = data.get("inputs_text"), data.get("inputs_file")
        if upload is not None and upload.size > settings.HEARTH_MAX_UPLOAD_BYTES:
            self.add_error(
                "inputs_file",
                f"the file is {upload.size} bytes; the limit is {settings.HEARTH_MAX_UPLOAD_BYTES}",
            )
        elif text and upload:
            self.add_error("inputs_file", "paste inputs or upload a file, not both")
        elif not text and not upload and "inputs_text" not in self.errors:
            self.add_error("inputs_text", "paste at least one line, or upload a JSONL file")
        return data

    def inline_inputs(self) -> list[str]:
        return [line for line in (self.cleaned_data.get("inputs_text") or "").splitlines() if line.strip()]


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, label="Key name", help_text="e.g. laptop, CI, batch-jobs")


class TopUpForm(forms.Form):
    amount = forms.DecimalField(
        label=f"Amount ({settings.HEARTH_CURRENCY.upper()})", min_value=Decimal("0.01"), decimal_places=2
    )

    def amount_minor(self) -> int:
        return int(self.cleaned_data["amount"] * 100)


class PolicyForm(forms.Form):
    battery_reserve_pct = forms.FloatField(
        label="Keep the battery above (%)",
        min_value=0,
        max_value=100,
        help_text="no new work below this charge",
    )
    solar_surplus_only = forms.BooleanField(label="Run only on solar surplus", required=False)
    allowed_hours = forms.CharField(
        label="Allowed hours",
        required=False,
        help_text="hours of the day, e.g. 9-17 or 0,1,2,22,23; empty means any hour",
    )
    max_gpu_watts = forms.IntegerField(label="GPU power cap (W)", required=False, min_value=1)
    price_per_1k = forms.DecimalField(
        label=f"Price per 1k items ({settings.HEARTH_CURRENCY.upper()})",
        min_value=Decimal("0"),
        decimal_places=2,
    )

    def clean_allowed_hours(self) -> list[int]:
        raw = (self.cleaned_data.get("allowed_hours") or "").replace(" ", "")
        hours: set[int] = set()
        for part in filter(None, raw.split(",")):
            try:
                if "-" in part:
                    first, last = (int(x) for x in part.split("-", 1))
                    if first > last:
                        raise ValidationError(f"{part}: the range must go upward (e.g. 9-17)")
                    hours.update(range(first, last + 1))
                else:
                    hours.add(int(part))
            except ValueError as exc:
                raise ValidationError(f"{part!r} is not an hour or a range like 9-17") from exc
        if any(not 0 <= h <= 23 for h in hours):
            raise ValidationError("hours run from 0 to 23")
        return sorted(hours)

    def changes(self) -> dict[str, object]:
        data = self.cleaned_data
        return {
            "battery_reserve_pct": data["battery_reserve_pct"],
            "solar_surplus_only": data["solar_surplus_only"],
            "allowed_hours": data["allowed_hours"],
            "max_gpu_watts": data["max_gpu_watts"],
            "price_per_1k_items_minor": int(data["price_per_1k"] * 100),
        }

    @staticmethod
    def initial_from(policy: Any) -> dict[str, Any]:
        return {
            "battery_reserve_pct": policy.battery_reserve_pct,
            "solar_surplus_only": policy.solar_surplus_only,
            "allowed_hours": hours_text(policy.allowed_hours),
            "max_gpu_watts": policy.max_gpu_watts,
            "price_per_1k": Decimal(policy.price_per_1k_items_minor) / 100,
        }


def hours_text(hours: list[int]) -> str:
    """[9, 10, 11, 17] → "9-11,17"."""
    runs: list[list[int]] = []
    for hour in sorted(hours):
        if runs and hour == runs[-1][1] + 1:
            runs[-1][1] = hour
        else:
            runs.append([hour, hour])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)
