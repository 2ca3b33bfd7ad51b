"""The bank canaries are cut from: ordinary-looking sentences and the model's own embedding of each,
computed on the server with the same pure-torch encoder the agents run (hearth_agent.bert)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
from django.db import transaction

from marketplace.catalog.models import CatalogModel
from marketplace.trust.models import CanaryItem

_SUBJECTS = (
    "The delivery van", "My neighbour", "A small bakery", "The city council", "Our support team",
    "The night train", "A local farmer", "The new library", "Her research group", "The football club",
    "A quiet student", "The hospital", "Our landlord", "The museum", "A travelling musician",
)  # fmt: skip
_VERBS = (
    "announced", "postponed", "reviewed", "celebrated", "questioned", "repaired", "published",
    "cancelled", "welcomed", "described",
)  # fmt: skip
_OBJECTS = (
    "the spring schedule", "a broken heating system", "the results of the survey", "an unusual request",
    "the price of electricity", "plans for a community garden", "the late shipment of books",
    "a proposal to extend opening hours", "the storm damage on the roof", "a recipe for rye bread",
)  # fmt: skip
_ENDINGS = (
    "on Monday morning.", "after a long discussion.", "without much fuss.", "to everyone's surprise.",
    "before the holidays.", "in a short email.", "despite the rain.", "for the third time this year.",
)  # fmt: skip


def canary_sentences(count: int, *, seed: int = 20261122) -> list[str]:
    """`count` distinct sentences in the shape of everyday text (deterministic for a seed)."""
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS))
    random.Random(seed).shuffle(combos)
    return [" ".join(parts) for parts in combos[:count]]


def embed(model: CatalogModel, texts: list[str]) -> np.ndarray:
    from hearth_agent.bert import BertSentenceEncoder

    encoder = BertSentenceEncoder(Path(model.source))
    return np.asarray(encoder.encode(texts), dtype="<f4")


@transaction.atomic
def canary_bank_build(*, model: CatalogModel, count: int = 400) -> int:
    """(Re)compute the bank for the model's current weights; a bank for older weights is replaced."""
    current = CanaryItem.objects.filter(model=model, weights_sha256=model.weights_sha256).count()
    if current >= count:
        return current
    CanaryItem.objects.filter(model=model).delete()
    texts = canary_sentences(count)
    vectors = embed(model, texts)
    CanaryItem.objects.bulk_create(
        CanaryItem(model=model, weights_sha256=model.weights_sha256, text=text, embedding=vector.tobytes())
        for text, vector in zip(texts, vectors, strict=True)
    )
    return len(texts)
