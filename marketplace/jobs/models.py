"""Jobs (a buyer's batch) and tasks (the shards hosts lease and run)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from marketplace.jobs.states import JobStatus, TaskStatus


class Verification(models.TextChoices):
    NONE = "none", "None"
    SPOT = "spot", "Spot checks"
    REDUNDANT = "redundant", "Redundant"


class TaskRole(models.TextChoices):
    PRIMARY = "primary", "Primary"  # the buyer's task; its output is what the buyer receives
    REPLICA = "replica", "Replica"  # another run of a primary's inputs, on another host
    CANARY = "canary", "Canary"  # a known-answer task; never part of a buyer's job


class Verdict(models.TextChoices):
    NONE = "", "Not judged yet"
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"
    UNCHECKED = "unchecked", "Accepted unchecked"


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    buyer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="jobs")
    model = models.ForeignKey("catalog.CatalogModel", on_delete=models.PROTECT, related_name="jobs")
    status = models.CharField(
        max_length=10, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    task_size = models.PositiveIntegerField()
    items_total = models.PositiveIntegerField()
    items_done = models.PositiveIntegerField(default=0)
    failure_reason = models.TextField(blank=True, default="")
    green_only = models.BooleanField(
        default=False, help_text="run only on hosts powered by solar/battery now"
    )
    verification = models.CharField(max_length=10, choices=Verification.choices, default=Verification.NONE)
    spot_fraction = models.FloatField(default=0.0, help_text="share of tasks re-run elsewhere (spot)")
    replicas = models.PositiveSmallIntegerField(default=1, help_text="runs per task (redundant: k)")
    max_price_per_1k_minor = models.PositiveIntegerField(
        default=0, help_text="the most the buyer pays per 1,000 items per run, minor units"
    )
    region = models.CharField(
        max_length=32, blank=True, default="", help_text="run only on hosts in this region; blank: any"
    )
    priority = models.PositiveSmallIntegerField(
        default=5, help_text="0-9: among the same buyer's jobs, higher is dispatched first"
    )
    deadline = models.DateTimeField(
        null=True, blank=True, help_text="a job still queued at this time fails with 'deadline passed'"
    )
    escrow_minor = models.PositiveBigIntegerField(
        default=0, help_text="held from the buyer's credit at submit: the worst case of the runs it pays"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.id} ({self.status})"


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="tasks")
    index = models.PositiveIntegerField(help_text="position of the task within its job")
    first_item = models.PositiveIntegerField(help_text="index of the task's first input within the job")
    inputs = models.JSONField()
    item_count = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    attempt = models.PositiveSmallIntegerField(default=0, help_text="how many leases it has had")

    lease_id = models.UUIDField(null=True, blank=True, unique=True)
    leased_to = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="leased_tasks"
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    assigned_at = models.DateTimeField(null=True, blank=True)

    output = models.BinaryField(null=True, blank=True, help_text="little-endian float32 vectors")
    output_sha256 = models.CharField(max_length=64, blank=True, default="")
    dimension = models.PositiveIntegerField(null=True, blank=True)
    compute_ms = models.FloatField(null=True, blank=True)
    energy_wh = models.FloatField(null=True, blank=True)
    energy_source = models.CharField(max_length=10, blank=True, default="")
    completed_by = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="completed_tasks"
    )
    completed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    # Verification: every run of the same inputs shares `group` (the primary's id).
    role = models.CharField(max_length=8, choices=TaskRole.choices, default=TaskRole.PRIMARY)
    group = models.UUIDField(null=True, blank=True, db_index=True)
    needs_trusted = models.BooleanField(default=False, help_text="a tie-break: only a trusted host runs it")
    verdict = models.CharField(max_length=10, choices=Verdict.choices, blank=True, default="")
    verdict_reason = models.TextField(blank=True, default="")
    settled = models.BooleanField(default=False, help_text="primary: the output is final for the buyer")
    expected = models.BinaryField(null=True, blank=True, help_text="canary: the known answer")

    # Money: who pays for a run, at what price, and what it was paid.
    billable = models.BooleanField(
        default=False, help_text="the buyer pays for this run (the runs planned at submit)"
    )
    price_per_1k_minor = models.PositiveIntegerField(
        null=True, blank=True, help_text="the host's price when it leased the run"
    )
    paid_minor = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="what the run's host was paid for it (empty: unpaid)"
    )
    paid_by_buyer = models.BooleanField(
        default=False, help_text="paid from the job's escrow, not the platform"
    )

    class Meta:
        ordering = ["job", "index"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "index"],
                condition=models.Q(role="primary"),
                name="unique_task_index_per_job",
            )
        ]
        indexes = [
            models.Index(fields=["status", "job"], name="task_status_job"),
            # Covering indexes for what each result and each progress read asks of a job's runs. The
            # row holds its inputs and output (kilobytes each) ahead of these columns: on SQLite a
            # scan of a 200-task job's rows walks their overflow pages, ~5 ms each time; these
            # answer from the index alone (~0.01-0.04 ms).
            models.Index(
                fields=[
                    "job",
                    "role",
                    "status",
                    "settled",
                    "verdict",
                    "needs_trusted",
                    "attempt",
                    "energy_source",
                    "energy_wh",
                ],
                name="task_job_progress",
            ),
            models.Index(
                fields=[
                    "job",
                    "completed_by",
                    "paid_by_buyer",
                    "paid_minor",
                    "item_count",
                    "price_per_1k_minor",
                ],
                name="task_job_host_paid",
            ),
        ]

    def __str__(self) -> str:
        return f"task {self.index} of {self.job_id} ({self.status})"
