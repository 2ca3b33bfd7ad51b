"""Hosts (home machines), their enrollment tokens and live connection state."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class EnrollmentToken(models.Model):
    """A one-time token a GPU owner hands to `hearth-agent enroll`."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="enrollment_tokens"
    )
    prefix = models.CharField(max_length=32)
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    host = models.OneToOneField(
        "Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="enrollment"
    )

    def __str__(self) -> str:
        return f"{self.prefix}… ({'used' if self.used_at else 'unused'})"


class Host(models.Model):
    class Status(models.TextChoices):
        OFFLINE = "offline", "Offline"
        ONLINE = "online", "Online"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="hosts")
    name = models.CharField(max_length=100)
    token_prefix = models.CharField(max_length=32)
    token_digest = models.CharField(max_length=64, unique=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OFFLINE, db_index=True)
    # The channel of the live websocket; frames for this host go here only.
    channel_name = models.CharField(max_length=200, blank=True, default="")
    connected_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    offline_after = models.DateTimeField(null=True, blank=True, db_index=True)
    ready = models.BooleanField(default=False)

    # What the agent said about itself in `hello`.
    agent_version = models.CharField(max_length=40, blank=True, default="")
    slots = models.PositiveSmallIntegerField(default=1)
    device = models.CharField(max_length=16, blank=True, default="")
    memory_mb = models.PositiveIntegerField(default=0)
    capabilities = models.JSONField(default=dict, blank=True)
    isolation = models.JSONField(default=list, blank=True)

    # The owner's side: energy policy (hearth_agent.policy.EnergyPolicy as JSON) and drain.
    policy = models.JSONField(default=dict, blank=True)
    region = models.CharField(
        max_length=32, blank=True, default="", help_text="where the machine is; jobs may ask for a region"
    )
    draining = models.BooleanField(default=False)
    draining_reason = models.CharField(max_length=200, blank=True, default="")

    # The last `power` frame, kept on the row so dispatch needs no extra query.
    power_source = models.CharField(max_length=16, blank=True, default="")
    power_at = models.DateTimeField(null=True, blank=True)
    gpu_w = models.FloatField(null=True, blank=True)
    battery_soc_pct = models.FloatField(null=True, blank=True)
    solar_w = models.FloatField(null=True, blank=True)
    grid_w = models.FloatField(null=True, blank=True)
    load_w = models.FloatField(null=True, blank=True)
    agent_work_allowed = models.BooleanField(default=True)
    agent_work_reason = models.CharField(max_length=200, blank=True, default="")

    # Trust (marketplace.trust): the measured hardware, canaries, checks and the consequences.
    benchmark = models.JSONField(default=dict, blank=True, help_text="the last BenchmarkReport")
    benchmark_at = models.DateTimeField(null=True, blank=True)
    benchmark_requested_at = models.DateTimeField(null=True, blank=True)
    hardware_ok = models.BooleanField(null=True, blank=True, help_text="None until a benchmark arrives")
    hardware_reason = models.CharField(max_length=400, blank=True, default="")
    verified_at = models.DateTimeField(null=True, blank=True)
    canaries_passed = models.PositiveIntegerField(default=0)
    canaries_failed = models.PositiveIntegerField(default=0)
    checks_passed = models.PositiveIntegerField(default=0, help_text="results that matched another run")
    checks_failed = models.PositiveIntegerField(default=0)
    pass_streak = models.PositiveIntegerField(default=0, help_text="verifications passed in a row")
    tasks_completed = models.PositiveIntegerField(default=0)
    tasks_failed = models.PositiveIntegerField(default=0)
    leases_expired = models.PositiveIntegerField(default=0)
    reliability = models.FloatField(default=0.5)
    quarantined_at = models.DateTimeField(null=True, blank=True)
    quarantine_reason = models.CharField(max_length=400, blank=True, default="")
    earnings_withheld = models.BooleanField(default=False, help_text="pending earnings held for review")

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class PowerSample(models.Model):
    """Power readings of a host, summed into time buckets so months of data stay small.

    Minute buckets are kept for two days, then rolled up into hour buckets,
    which are kept for about a year (see hosts.services.power_rollup).
    Each field keeps a sum and a count, since a site may lack some meters.
    """

    MINUTE = 60
    HOUR = 3600

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="power_samples")
    resolution_s = models.PositiveIntegerField()
    bucket_start = models.DateTimeField()
    samples = models.PositiveIntegerField(default=0)
    gpu_w_sum = models.FloatField(default=0)
    gpu_w_n = models.PositiveIntegerField(default=0)
    battery_soc_pct_sum = models.FloatField(default=0)
    battery_soc_pct_n = models.PositiveIntegerField(default=0)
    solar_w_sum = models.FloatField(default=0)
    solar_w_n = models.PositiveIntegerField(default=0)
    grid_w_sum = models.FloatField(default=0)
    grid_w_n = models.PositiveIntegerField(default=0)
    load_w_sum = models.FloatField(default=0)
    load_w_n = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["host", "resolution_s", "bucket_start"], name="unique_power_bucket"
            )
        ]
        indexes = [models.Index(fields=["resolution_s", "bucket_start"], name="power_bucket_age")]

    def __str__(self) -> str:
        return f"{self.host_id} {self.resolution_s}s @ {self.bucket_start:%Y-%m-%d %H:%M}"

    def average(self, field: str) -> float | None:
        count = getattr(self, f"{field}_n")
        return getattr(self, f"{field}_sum") / count if count else None
