"""What trust is built from: strikes with their evidence, agent sessions (uptime), every change of a
host's reliability score with its reason, and the bank of known answers canaries are cut from."""

from __future__ import annotations

from django.db import models


class Strike(models.Model):
    class Kind(models.TextChoices):
        CANARY = "canary", "Wrong answer to a known-answer task"
        MISMATCH = "mismatch", "Result disagreed with a trusted run"
        HARDWARE = "hardware", "Claimed hardware does not match its benchmark"
        NO_ANSWER = "no_answer", "Held a task while connected and never answered"

    host = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="strikes")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    task = models.ForeignKey("jobs.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    evidence = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} strike on {self.host_id}"


class HostSession(models.Model):
    """One websocket session of an agent: the raw material of uptime."""

    host = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="sessions")
    channel_name = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["host", "started_at"], name="session_host_start")]

    def __str__(self) -> str:
        return f"session of {self.host_id} from {self.started_at:%Y-%m-%d %H:%M}"


class ReliabilityEvent(models.Model):
    """A change of a host's reliability score and the reason, in words the owner can read."""

    host = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="reliability_events")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    score_before = models.FloatField()
    score_after = models.FloatField()
    reason = models.TextField()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.score_before:.2f} → {self.score_after:.2f}: {self.reason[:60]}"


class CanaryItem(models.Model):
    """One sentence and the model's known embedding of it (little-endian float32)."""

    model = models.ForeignKey("catalog.CatalogModel", on_delete=models.CASCADE, related_name="canary_items")
    weights_sha256 = models.CharField(max_length=64, help_text="the weights the answer was computed with")
    text = models.TextField()
    embedding = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "text"], name="unique_canary_text")]

    def __str__(self) -> str:
        return self.text[:60]
