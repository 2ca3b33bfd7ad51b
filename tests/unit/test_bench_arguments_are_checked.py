"""A benchmark given a count or a rate of zero, below zero or not a number stops at once with
argparse's usage error naming the option, before it seeds or starts anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("bench.dispatch", "--rate", "-5"), "argument --rate: must be a finite number above 0, not -5"),
        (("bench.dispatch", "--rate", "nan"), "argument --rate: must be a finite number above 0, not nan"),
        (("bench.dispatch", "--hosts", "0"), "argument --hosts: must be above 0, not 0"),
        (("bench.dispatch", "--tasks", "ten"), "argument --tasks: must be a whole number, not 'ten'"),
        (("bench.fanin", "--agents", "-1"), "argument --agents: must be above 0, not -1"),
        (("bench.fanin", "--hold", "0"), "argument --hold: must be a finite number above 0, not 0"),
        (("bench.e2e", "--items", "0"), "argument --items: must be above 0, not 0"),
    ],
)
def test_a_benchmark_refuses_a_count_or_rate_that_is_not_above_zero(args: tuple[str, ...], says: str) -> None:
    done = _bench(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert says in done.stderr
    assert done.stdout == ""


def test_a_benchmark_still_takes_a_positive_rate_and_count() -> None:
    from bench._args import positive_float, positive_int

    assert positive_float("560") == 560.0
    assert positive_float("0.5") == 0.5
    assert positive_int("10000") == 10_000
