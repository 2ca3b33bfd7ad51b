"""Settings come from the environment through typed readers that fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from marketplace.config.env import ImproperEnvironment, env_bool, env_choice, env_float, env_int, env_str


def test_an_unset_variable_gives_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEARTH_X", raising=False)
    assert env_int("HEARTH_X", 7) == 7
    assert env_str("HEARTH_X", "sqlite") == "sqlite"


@pytest.mark.parametrize(
    ("reader", "value", "message"),
    [
        (lambda: env_int("HEARTH_X", 1), "ten", "HEARTH_X must be an integer"),
        (lambda: env_int("HEARTH_X", 1, minimum=1), "0", "HEARTH_X must be >= 1"),
        (lambda: env_float("HEARTH_X", 1.0), "fast", "HEARTH_X must be a number"),
        (lambda: env_bool("HEARTH_X", False), "maybe", "HEARTH_X must be a boolean"),
        (lambda: env_choice("HEARTH_X", "a", ("a", "b")), "c", "HEARTH_X must be one of a, b"),
    ],
)
def test_a_bad_value_fails_loudly_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, reader: object, value: str, message: str
) -> None:
    monkeypatch.setenv("HEARTH_X", value)
    with pytest.raises(ImproperEnvironment, match=message):
        reader()  # type: ignore[operator]


def test_a_secret_may_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    monkeypatch.delenv("HEARTH_X", raising=False)
    monkeypatch.setenv("HEARTH_X_FILE", str(secret))
    assert env_str("HEARTH_X", "default") == "s3cr3t"


def test_the_embedded_default_is_sqlite_and_in_memory_channels(settings: object) -> None:
    import os

    from django.conf import settings as django_settings

    if os.environ.get("DATABASE_URL") or os.environ.get("REDIS_URL"):
        assert django_settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
        assert django_settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
        assert django_settings.HEARTH_BACKGROUND == "celery"
    else:
        assert django_settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
        assert django_settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
        assert django_settings.HEARTH_BACKGROUND == "inprocess"
