"""Billing settings: the platform fee is a percentage read exactly, as integer basis points."""

from __future__ import annotations

import pytest

from marketplace.config.env import ImproperEnvironment, env_percent_bps


@pytest.mark.parametrize(
    ("raw", "bps"), [("15", 1500), ("12.5", 1250), ("0", 0), ("100", 10000), ("0.01", 1)]
)
def test_a_fee_percentage_becomes_basis_points(monkeypatch, raw, bps):
    monkeypatch.setenv("HEARTH_PLATFORM_FEE_PCT", raw)
    assert env_percent_bps("HEARTH_PLATFORM_FEE_PCT", "15") == bps


@pytest.mark.parametrize("raw", ["fifteen", "-1", "100.5", "12.345", "nan"])
def test_a_bad_fee_percentage_fails_loudly(monkeypatch, raw):
    monkeypatch.setenv("HEARTH_PLATFORM_FEE_PCT", raw)
    with pytest.raises(ImproperEnvironment, match="HEARTH_PLATFORM_FEE_PCT"):
        env_percent_bps("HEARTH_PLATFORM_FEE_PCT", "15")
