"""The jobs REST API: submit, status, results, cancel."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.http import Http404, StreamingHttpResponse
from rest_framework import status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.authentication import request_user
from marketplace.config.api_errors import Conflict, PayloadTooLarge
from marketplace.jobs.inputs import inputs_from_jsonl
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import (
    job_get_for_buyer,
    job_list_for_buyer,
    job_results_jsonl,
    job_summaries,
    job_summary,
)
from marketplace.jobs.services import JobTooLarge, check_job_spec, job_cancel, job_submit
from marketplace.jobs.states import JobStatus


def _own_job(request: Request, job_id: str) -> Job:
    job = job_get_for_buyer(buyer=request_user(request), job_id=job_id)
    if job is None:
        raise Http404("no such job")
    return job


def _boolean(raw: Any) -> Any:
    """Form fields arrive as text; JSON booleans pass through for the service to check."""
    if isinstance(raw, str) and raw.lower() in {"true", "false", "1", "0", "on", "off"}:
        return raw.lower() in {"true", "1", "on"}
    return raw


def _task_size(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError as exc:
            raise ValidationError({"task_size": ["task_size must be an integer"]}) from exc
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValidationError({"task_size": ["task_size must be an integer"]})
    return raw


def _number(raw: Any, field: str) -> Any:
    """Form fields arrive as text; JSON numbers pass through for the service to check."""
    if not isinstance(raw, str) or raw == "":
        return None if raw == "" else raw
    try:
        return float(raw) if "." in raw else int(raw)
    except ValueError as exc:
        raise ValidationError({field: [f"{field} must be a number"]}) from exc


class JobListCreateApi(APIView):
    parser_classes = [JSONParser, MultiPartParser, FormParser]

    def get(self, request: Request) -> Response:
        return Response(job_summaries(jobs=job_list_for_buyer(buyer=request_user(request))[:100]))

    def post(self, request: Request) -> Response:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > settings.HEARTH_MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(
                f"request body is {length} bytes; the limit is {settings.HEARTH_MAX_UPLOAD_BYTES}"
            )
        data: Any = request.data
        upload = request.FILES.get("file") if hasattr(request, "FILES") else None
        if upload is not None and "inputs" in data:
            raise ValidationError({"inputs": ["send inputs inline or as a file, not both"]})
        if upload is not None:
            if upload.size > settings.HEARTH_MAX_UPLOAD_BYTES:
                raise PayloadTooLarge(
                    f"file is {upload.size} bytes; the limit is {settings.HEARTH_MAX_UPLOAD_BYTES}"
                )
            inputs: Any = inputs_from_jsonl(upload.read())
        elif "inputs" in data:
            inputs = data["inputs"]
        else:
            raise ValidationError(
                {"inputs": ["inputs is required (a list of strings, or upload a JSONL file)"]}
            )
        if "model" not in data:
            raise ValidationError({"model": ["model is required"]})
        try:
            spec = check_job_spec(
                green_only=_boolean(data.get("green_only", False)),
                model_name=data["model"],
                inputs=inputs,
                task_size=_task_size(data.get("task_size")),
                verification=data.get("verification"),
                spot_fraction=_number(data.get("spot_fraction"), "spot_fraction"),
                replicas=_number(data.get("replicas"), "replicas"),
                max_price_per_1k_minor=_number(data.get("max_price_per_1k_minor"), "max_price_per_1k_minor"),
                priority=_number(data.get("priority"), "priority"),
                deadline=data.get("deadline"),
                region=data.get("region"),
            )
        except JobTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from exc
        job = job_submit(buyer=request_user(request), spec=spec)
        return Response(job_summary(job=job), status=status.HTTP_201_CREATED)


class JobDetailApi(APIView):
    def get(self, request: Request, job_id: str) -> Response:
        return Response(job_summary(job=_own_job(request, job_id)))


class JobResultsApi(APIView):
    def get(self, request: Request, job_id: str) -> StreamingHttpResponse:
        job = _own_job(request, job_id)
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(f"job is {job.status}; results are ready when it has succeeded")
        response = StreamingHttpResponse(job_results_jsonl(job=job), content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="job-{job.pk}.jsonl"'
        return response


class JobCancelApi(APIView):
    def post(self, request: Request, job_id: str) -> Response:
        job = _own_job(request, job_id)
        if job.status == JobStatus.SUCCEEDED:
            raise Conflict("job has already succeeded")
        return Response(job_summary(job=job_cancel(job=job)))
