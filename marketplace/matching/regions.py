"""Region names, shared by jobs (where work may run) and hosts (where a machine is)."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def check_region(raw: object) -> str:
    """A region name (lowercase letters, digits, dashes, up to 32), or blank for any region."""
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ValidationError({"region": ["region must be a string such as 'eu-west'"]})
    region = raw.strip().lower()
    if region and not _REGION.fullmatch(region):
        raise ValidationError(
            {"region": ["region must be up to 32 lowercase letters, digits and dashes, such as 'eu-west'"]}
        )
    return region
