"""Operator endpoints for dispatch: why a host does or does not get a task."""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.http import Http404
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.hosts.models import Host
from marketplace.jobs.models import Task
from marketplace.matching.selectors import dispatch_explain


def _uuid_param(request: Request, name: str) -> uuid.UUID:
    raw = request.query_params.get(name)
    if not raw:
        raise ValidationError({name: [f"{name} is required (a {name} id)"]})
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise ValidationError({name: [f"{name} must be a {name} id (a UUID), not {raw!r}"]}) from exc


class DispatchExplainApi(APIView):
    """GET ?task=<id>&host=<id>: the filter that rejects the pair, if any, and the score's parts."""

    permission_classes = [IsAdminUser]

    def get(self, request: Request) -> Response:
        task_id, host_id = _uuid_param(request, "task"), _uuid_param(request, "host")
        task = Task.objects.select_related("job__model").filter(pk=task_id).first()
        if task is None:
            raise Http404("no such task")
        host = Host.objects.filter(pk=host_id).first()
        if host is None:
            raise Http404("no such host")
        return Response(dispatch_explain(task=task, host=host))
