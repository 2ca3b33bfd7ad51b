"""Argument types for the benchmarks' command lines: a count or a rate must be above zero, and
argparse says which option was wrong ("argument --rate: must be above 0, not -5")."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not value > 0 or value == float("inf"):  # NaN and infinity too
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value
