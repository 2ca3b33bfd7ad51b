"""Template filters for the pages."""

from __future__ import annotations

from django import template

from marketplace.dashboard.selectors import money as money_text

register = template.Library()


@register.filter
def money(amount_minor: int | None) -> str:
    """Minor units in the platform currency: `150` → `1.50 USD`."""
    return money_text(amount_minor)


@register.filter
def percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.0f}%"
