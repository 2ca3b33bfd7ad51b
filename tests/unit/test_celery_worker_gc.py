"""The Celery worker, which runs the dispatch rounds, collects young objects as the server does, so
a round's rows and views are not promoted into full collections that stop it for seconds."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from celery.signals import worker_init
from django.test import override_settings

from marketplace.config import celery


@pytest.fixture
def thresholds_restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("thresholds_restored")
def test_a_starting_worker_collects_young_objects_after_hearth_gc_gen0_new_ones() -> None:
    gc.set_threshold(700, 10, 10)
    # What `worker_init.send` would call: sent from here, Celery's Django fixup (also connected)
    # would want a real worker instance as the sender.
    handlers = [ref() for _, ref in worker_init.receivers]
    assert celery._collect_garbage_like_the_server in handlers
    with override_settings(HEARTH_GC_GEN0=23456):
        celery._collect_garbage_like_the_server(sender=None)
    assert gc.get_threshold() == (23456, 20, 10)
