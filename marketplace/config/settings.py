"""Hearth settings, read from the environment.

With no environment at all this is the embedded one-machine setup: SQLite,
the in-memory channel layer and background work on an in-process loop.
`DATABASE_URL` switches to PostgreSQL, `REDIS_URL` to channels_redis + Celery.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from marketplace.config import gc_tuning
from marketplace.config.env import (
    ImproperEnvironment,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_optional,
    env_percent_bps,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(env_str("HEARTH_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "dev-only-insecure-key-change-me-in-production-0123456789")
ALLOWED_HOSTS = env_str("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in env_str("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "marketplace.accounts",
    "marketplace.catalog",
    "marketplace.hosts",
    "marketplace.jobs",
    "marketplace.matching",
    "marketplace.trust",
    "marketplace.gateway",
    "marketplace.dashboard",
    "marketplace.billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "marketplace.config.urls"
ASGI_APPLICATION = "marketplace.config.asgi.application"
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "frontend" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_optional("DATABASE_URL")
if DATABASE_URL:
    # Kept open between calls (checked before reuse): the server's database work runs on one thread,
    # and reconnecting for every agent frame cost more than the frame's queries (bench.fanin).
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            conn_max_age=env_int("HEARTH_DB_CONN_MAX_AGE", 60, minimum=0),
            conn_health_checks=True,
        )
    }
    DATABASES["default"].setdefault("TEST", {})
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("HEARTH_SQLITE_PATH", str(VAR_DIR / "hearth.sqlite3")),
            "OPTIONS": {
                # Several threads (consumers, API, background loop) write at once:
                # WAL lets readers proceed, IMMEDIATE avoids upgrade deadlocks.
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # Kept open between calls too: otherwise every agent frame and API request opens the file,
            # runs the PRAGMAs and closes it (the last one to close checkpoints the WAL): 710 times in
            # a 1,000-item bench.e2e run, on the same cores as the agents' compute.
            "CONN_MAX_AGE": env_int("HEARTH_DB_CONN_MAX_AGE", 60, minimum=0),
            "CONN_HEALTH_CHECKS": True,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_optional("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 defaults socket_timeout to 5 s, which aborts the blocking
            # BZPOPMIN a consumer waits on and tears idle sockets down (channels_redis#422).
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
                "capacity": 1000,
                "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Background work: Celery worker + beat on Redis, or an in-process loop.
HEARTH_BACKGROUND = env_choice(
    "HEARTH_BACKGROUND", "celery" if REDIS_URL else "inprocess", ("celery", "inprocess")
)
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = HEARTH_BACKGROUND == "inprocess"
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
HEARTH_SWEEP_INTERVAL_S = env_float("HEARTH_SWEEP_INTERVAL_S", 2.0, minimum=0.1)

# Dispatch and agents.
HEARTH_HEARTBEAT_INTERVAL_S = env_float("HEARTH_HEARTBEAT_INTERVAL_S", 10.0, minimum=0.1)
# A host is offline once this many heartbeat intervals pass without one. Below 2 so that a host
# which vanishes without a disconnect (SIGSTOP, a dropped network) is swept within two intervals of
# its last beat, plus one sweep interval; 1.5 leaves half an interval for a late beat.
HEARTH_OFFLINE_AFTER_BEATS = env_float("HEARTH_OFFLINE_AFTER_BEATS", 1.5, minimum=1.1)
# Where heartbeats land before the sweep flushes them to the hosts table in batches: "memory" (this
# process; the embedded default), "redis" (shared by every server process and the Celery worker), or
# "db" (the old path: one UPDATE per beat; kept as the fan-in bench's baseline).
HEARTH_PRESENCE = env_choice("HEARTH_PRESENCE", "redis" if REDIS_URL else "memory", ("memory", "redis", "db"))
if HEARTH_PRESENCE == "memory" and HEARTH_BACKGROUND == "celery":
    raise ImproperEnvironment(
        "HEARTH_PRESENCE=memory needs HEARTH_BACKGROUND=inprocess: a Celery sweeper cannot read this memory"
    )
if HEARTH_PRESENCE == "redis" and not REDIS_URL:
    raise ImproperEnvironment("HEARTH_PRESENCE=redis needs REDIS_URL")
HEARTH_POWER_INTERVAL_S = env_float("HEARTH_POWER_INTERVAL_S", 10.0, minimum=0.1)
# Threads (each with its own database connection) that run the agent sockets' database work; one
# socket's work still runs in order. PostgreSQL serves several at once, and a connect is mostly
# waiting on its round trips (bench.fanin); SQLite takes one writer at a time, so one thread there.
HEARTH_GATEWAY_DB_THREADS = env_int("HEARTH_GATEWAY_DB_THREADS", 4 if DATABASE_URL else 1, minimum=1)
# The server and the Celery worker collect their youngest objects after this many new ones (CPython:
# 700). With 700, the objects of every heartbeat in flight were promoted, and at 10,000 sockets full
# collections of ~1.6M objects stopped the event loop for 1.4 to 1.8 s every ~7 s (bench.fanin with a
# gc callback); with 50,000, none ran in a 60 s hold and heartbeat p99 fell from 2.4 s to 31 ms.
HEARTH_GC_GEN0 = env_int("HEARTH_GC_GEN0", gc_tuning.GEN0, minimum=1)
# The server process's GIL switch interval, in ms (CPython: 5): how long a running thread keeps the
# GIL once another asks for it. The event loop gives it up at every system call (gc_tuning).
HEARTH_GIL_SWITCH_MS = env_float("HEARTH_GIL_SWITCH_MS", gc_tuning.GIL_SWITCH_MS, minimum=0.05)
# A socket must send its hello (which carries the token check) this soon after it opens, or it is
# closed: the token is checked with the hello, so an unchecked socket is held open only this long.
HEARTH_HELLO_TIMEOUT_S = env_float("HEARTH_HELLO_TIMEOUT_S", 30.0, minimum=0.1)
HEARTH_LEASE_SECONDS = env_float("HEARTH_LEASE_SECONDS", 120.0, minimum=1.0)
HEARTH_MAX_ATTEMPTS = env_int("HEARTH_MAX_ATTEMPTS", 3, minimum=1)
HEARTH_ENROLLMENT_TOKEN_TTL_S = env_int("HEARTH_ENROLLMENT_TOKEN_TTL_S", 24 * 3600, minimum=60)
# A lease is renewed by heartbeats only up to this long after assignment: a host that holds a task
# and never answers loses it (and gets a strike) however faithfully it heartbeats.
HEARTH_TASK_MAX_RUNTIME_S = env_float("HEARTH_TASK_MAX_RUNTIME_S", 600.0, minimum=1.0)

# Trust (marketplace.trust).
HEARTH_EMBEDDING_MIN_COSINE = env_float("HEARTH_EMBEDDING_MIN_COSINE", 0.999, minimum=0.0)
HEARTH_CANARIES_TO_VERIFY = env_int("HEARTH_CANARIES_TO_VERIFY", 3, minimum=1)
HEARTH_CANARY_RATE_MAX = env_float("HEARTH_CANARY_RATE_MAX", 0.5, minimum=0.0)
HEARTH_CANARY_RATE_MIN = env_float("HEARTH_CANARY_RATE_MIN", 0.02, minimum=0.0)
HEARTH_STRIKES_TO_QUARANTINE = env_int("HEARTH_STRIKES_TO_QUARANTINE", 3, minimum=1)
# A struck host's unchecked results in jobs still running are re-run elsewhere before delivery.
HEARTH_RECHECK_AFTER_STRIKE = env_bool("HEARTH_RECHECK_AFTER_STRIKE", True)
HEARTH_TRUSTED_MIN_SCORE = env_float("HEARTH_TRUSTED_MIN_SCORE", 0.7, minimum=0.0)
HEARTH_DEFAULT_SPOT_FRACTION = env_float("HEARTH_DEFAULT_SPOT_FRACTION", 0.05, minimum=0.0)
HEARTH_REBENCHMARK_S = env_float("HEARTH_REBENCHMARK_S", 24 * 3600.0, minimum=1.0)
# Besides the periodic re-benchmark, each online host is asked at random, on average this often.
HEARTH_REBENCHMARK_RANDOM_MEAN_S = env_float("HEARTH_REBENCHMARK_RANDOM_MEAN_S", 12 * 3600.0, minimum=1.0)
# Hosts asked to measure again in one sweep at most (the rest wait for the next sweeps).
HEARTH_REBENCHMARK_PER_SWEEP = env_int("HEARTH_REBENCHMARK_PER_SWEEP", 200, minimum=1)

# Job limits.
HEARTH_DEFAULT_TASK_SIZE = env_int("HEARTH_DEFAULT_TASK_SIZE", 64, minimum=1)
HEARTH_MAX_TASK_SIZE = env_int("HEARTH_MAX_TASK_SIZE", 1024, minimum=1)
HEARTH_MAX_JOB_ITEMS = env_int("HEARTH_MAX_JOB_ITEMS", 100_000, minimum=1)
HEARTH_MAX_ITEM_CHARS = env_int("HEARTH_MAX_ITEM_CHARS", 20_000, minimum=1)
HEARTH_MAX_UPLOAD_BYTES = env_int("HEARTH_MAX_UPLOAD_BYTES", 32 * 1024 * 1024, minimum=1024)
# Django must let big bodies through so the API can answer 413 itself.
DATA_UPLOAD_MAX_MEMORY_SIZE = HEARTH_MAX_UPLOAD_BYTES + 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024

# Password-reset mail: printed to the server's log unless a real backend is configured.
EMAIL_BACKEND = env_str("DJANGO_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("DJANGO_DEFAULT_FROM_EMAIL", "Hearth <no-reply@hearth.local>")

HEARTH_PUBLIC_URL = env_str("HEARTH_PUBLIC_URL", "http://127.0.0.1:8000")

# Billing: money is integer minor units of one currency. Stripe is reached at
# HEARTH_STRIPE_API_BASE (the local fake in tests and the demo). With no webhook
# secret every webhook is refused: an empty HMAC key would accept forgeries.
HEARTH_CURRENCY = env_str("HEARTH_CURRENCY", "usd").lower()
HEARTH_STRIPE_API_KEY = env_str("HEARTH_STRIPE_API_KEY", "")
HEARTH_STRIPE_API_BASE = env_str("HEARTH_STRIPE_API_BASE", "https://api.stripe.com")
HEARTH_STRIPE_WEBHOOK_SECRET = env_str("HEARTH_STRIPE_WEBHOOK_SECRET", "")
HEARTH_STRIPE_TIMEOUT_S = env_float("HEARTH_STRIPE_TIMEOUT_S", 30.0, minimum=0.05)
# Every POST we send carries our own idempotency key, so the client's retries are safe.
HEARTH_STRIPE_MAX_NETWORK_RETRIES = env_int("HEARTH_STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0)
# The platform's share of each capture, e.g. "15" or "12.5" percent, kept as basis points.
HEARTH_PLATFORM_FEE_BPS = env_percent_bps("HEARTH_PLATFORM_FEE_PCT", "15")
# Host earnings stay pending this long (the verification window) before they can be paid out.
HEARTH_EARNINGS_HOLD_S = env_int("HEARTH_EARNINGS_HOLD_S", 24 * 3600, minimum=0)
# A host owner is paid when their available balance reaches this (the whole balance is sent).
HEARTH_PAYOUT_THRESHOLD_MINOR = env_int("HEARTH_PAYOUT_THRESHOLD_MINOR", 1000, minimum=1)
HEARTH_PAYOUT_INTERVAL_S = env_float("HEARTH_PAYOUT_INTERVAL_S", 3600.0, minimum=1.0)
# A job's max price per 1,000 items per run when the buyer names none, and the most one may name.
HEARTH_DEFAULT_MAX_PRICE_PER_1K_MINOR = env_int("HEARTH_DEFAULT_MAX_PRICE_PER_1K_MINOR", 100, minimum=0)
HEARTH_MAX_PRICE_PER_1K_LIMIT_MINOR = env_int("HEARTH_MAX_PRICE_PER_1K_LIMIT_MINOR", 100_000, minimum=1)
# Credit each new buyer gets from the platform at sign-up (0: none; tests and trials set it).
HEARTH_SIGNUP_CREDIT_MINOR = env_int("HEARTH_SIGNUP_CREDIT_MINOR", 0, minimum=0)
HEARTH_TOPUP_MIN_MINOR = env_int("HEARTH_TOPUP_MIN_MINOR", 500, minimum=1)
HEARTH_TOPUP_MAX_MINOR = env_int("HEARTH_TOPUP_MAX_MINOR", 1_000_000, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "marketplace.config.api_errors.exception_handler",
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "frontend" / "static"]
STATIC_ROOT = VAR_DIR / "static"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("HEARTH_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
