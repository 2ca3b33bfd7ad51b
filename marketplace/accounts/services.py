"""Writes for accounts: sign-up and API key lifecycle."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.tokens import secret_issue
from marketplace.billing.services import credit_grant

API_KEY_KIND = "hk"


def user_signup(*, email: str, password: str, role: str) -> User:
    """Create a user; raise ValidationError keyed by field on bad input."""
    email = User.objects.normalize_email(email).strip().lower()
    if User.objects.filter(email__iexact=email).exists():
        raise ValidationError({"email": ["an account with this email already exists"]})
    if role not in User.Role.values:
        raise ValidationError({"role": [f"role must be one of {', '.join(User.Role.values)}"]})
    candidate = User(username=email, email=email, role=role)
    try:
        validate_password(password, user=candidate)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from exc
    candidate.set_password(password)
    with transaction.atomic():
        candidate.save()
        if role == User.Role.BUYER and settings.HEARTH_SIGNUP_CREDIT_MINOR:
            credit_grant(
                user=candidate,
                amount_minor=settings.HEARTH_SIGNUP_CREDIT_MINOR,
                key=f"signup:{candidate.pk}",
                memo="sign-up credit",
            )
    return candidate


@dataclass(frozen=True)
class CreatedApiKey:
    api_key: ApiKey
    plaintext: str


def api_key_create(*, user: User, name: str) -> CreatedApiKey:
    """Issue a key; the plaintext is returned here once and never stored."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": ["a key needs a name"]})
    issued = secret_issue(API_KEY_KIND)
    key = ApiKey.objects.create(user=user, name=name, prefix=issued.prefix, digest=issued.digest)
    return CreatedApiKey(api_key=key, plaintext=issued.plaintext)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db()
    return api_key
