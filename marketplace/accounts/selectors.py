"""Reads for accounts."""

from __future__ import annotations

from django.db.models import QuerySet
from django.utils import timezone

from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.tokens import secret_digest


def api_key_list_for_user(*, user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user)


def api_key_authenticate(*, plaintext: str) -> ApiKey | None:
    """The active key matching `plaintext`, touching its last use."""
    key = (
        ApiKey.objects.select_related("user")
        .filter(digest=secret_digest(plaintext), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if key is not None:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
    return key
