"""Parsing uploaded JSONL inputs: one JSON string, or {"text": "..."}, per line."""

from __future__ import annotations

import json

from django.core.exceptions import ValidationError


def inputs_from_jsonl(content: bytes, *, field: str = "file") -> list[str]:
    """Return the texts in file order; the error names the line that is wrong."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError({field: [f"file is not UTF-8 (byte {exc.start})"]}) from exc
    items: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError({field: [f"line {number}: not valid JSON ({exc.msg})"]}) from exc
        if isinstance(value, dict):
            if set(value) != {"text"} or not isinstance(value["text"], str):
                raise ValidationError({field: [f'line {number}: expected a string or {{"text": "..."}}']})
            value = value["text"]
        if not isinstance(value, str):
            raise ValidationError({field: [f"line {number}: expected a string, got {type(value).__name__}"]})
        items.append(value)
    if not items:
        raise ValidationError({field: ["file holds no inputs"]})
    return items
