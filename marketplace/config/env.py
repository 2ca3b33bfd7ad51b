"""Typed readers for settings from the environment; a bad value fails loudly.

Any secret may also come from a file: `X_FILE=/path` is read when `X` is unset.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)


class ImproperEnvironment(ValueError):
    pass


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None and (file_name := os.environ.get(f"{name}_FILE")):
        value = Path(file_name).read_text().strip()
    return value


def env_str(name: str, default: str) -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def env_optional(name: str) -> str | None:
    value = _raw(name)
    return value or None


def _env_number(name: str, default: N, parse: type[N], minimum: N | None) -> N:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = parse(value)
    except ValueError as exc:
        kind = "an integer" if parse is int else "a number"
        raise ImproperEnvironment(f"{name} must be {kind}, got {value!r}") from exc
    if minimum is not None and number < minimum:
        raise ImproperEnvironment(f"{name} must be >= {minimum}, got {number}")
    return number


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    return _env_number(name, default, int, minimum)


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    return _env_number(name, default, float, minimum)


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperEnvironment(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise ImproperEnvironment(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def env_percent_bps(name: str, default: str) -> int:
    """A percentage such as `15` or `12.5`, returned as integer basis points (1500, 1250)."""
    value = env_str(name, default)
    try:
        percent = Decimal(value)
    except InvalidOperation as exc:
        raise ImproperEnvironment(f"{name} must be a percentage such as 15 or 12.5, got {value!r}") from exc
    bps = percent * 100
    if not percent.is_finite() or bps != bps.to_integral_value() or not 0 <= percent <= 100:
        raise ImproperEnvironment(
            f"{name} must be a percentage from 0 to 100 with at most two decimals, got {value!r}"
        )
    return int(bps)
