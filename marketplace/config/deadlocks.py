"""Running a unit of database work again when PostgreSQL picked it as a deadlock's victim.

PostgreSQL breaks a cycle of transactions waiting on each other's row locks by aborting one of them
(SQLSTATE 40P01); that one is rolled back whole and may simply run again. Without this, a result
whose transaction lost such a cycle closed the agent's socket with 1011 (CI, PostgreSQL leg).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from django.db import OperationalError

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# deadlock_detected, serialization_failure: "the transaction was rolled back; run it again".
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
ATTEMPTS = 4


def is_deadlock(exc: BaseException) -> bool:
    return (
        isinstance(exc, OperationalError) and getattr(exc.__cause__, "sqlstate", None) in _RETRYABLE_SQLSTATES
    )


def retrying_deadlocks(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run again (up to ATTEMPTS times in all, after a short pause) while its transaction is
    a deadlock's victim. Only for work that is one transaction, or idempotent from any point at
    which a statement can fail, and never inside an outer transaction, which the abort has ended."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn(*args, **kwargs)
            except OperationalError as exc:
                if attempt == ATTEMPTS or not is_deadlock(exc):
                    raise
                logger.warning(
                    "%s lost a deadlock (attempt %d of %d); running it again", fn.__name__, attempt, ATTEMPTS
                )
                time.sleep(0.02 * attempt)
        raise AssertionError("unreachable")

    return run
