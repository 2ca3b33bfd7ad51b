"""REST endpoints for GPU owners (tokens, machines) and for agents (enroll)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.utils import timezone
from pydantic import ValidationError as PydanticValidationError
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.authentication import request_user
from marketplace.config.api_errors import pydantic_errors_by_field
from marketplace.hosts.models import Host
from marketplace.hosts.power import METERS, power_history
from marketplace.hosts.selectors import host_list_for_owner
from marketplace.hosts.services import (
    enrollment_token_create,
    host_enroll,
    host_policy,
    host_policy_update,
    host_token_revoke,
    host_update,
)
from marketplace.trust.selectors import host_reliability, host_trust_summary


def _power_json(host: Host) -> dict[str, Any] | None:
    if host.power_at is None:
        return None
    return {
        "at": host.power_at,
        "source": host.power_source,
        **{meter: getattr(host, meter) for meter in METERS},
        "work_allowed": host.agent_work_allowed,
        "reason": host.agent_work_reason,
    }


def _host_json(host: Host) -> dict[str, Any]:
    return {
        "id": str(host.pk),
        "name": host.name,
        "status": host.status,
        "ready": host.ready,
        "tasks_in_flight": getattr(host, "tasks_in_flight", None),
        "canaries_in_flight": getattr(host, "canaries_in_flight", None),
        "revoked": host.revoked_at is not None,
        "agent_version": host.agent_version,
        "device": host.device,
        "slots": host.slots,
        "memory_mb": host.memory_mb,
        "region": host.region,
        "isolation": host.isolation,
        "draining": host.draining,
        "draining_reason": host.draining_reason,
        "policy": host_policy(host=host).model_dump(mode="json"),
        "power": _power_json(host),
        "trust": host_trust_summary(host=host),
        "last_seen_at": host.last_seen_at,
        "created_at": host.created_at,
    }


class EnrollmentTokenCreateApi(APIView):
    def post(self, request: Request) -> Response:
        created = enrollment_token_create(owner=request_user(request))
        server = request.build_absolute_uri("/").rstrip("/") or settings.HEARTH_PUBLIC_URL
        return Response(
            {
                "token": created.plaintext,
                "expires_at": created.token.expires_at,
                "enroll_command": f"hearth-agent enroll --server {server} --token {created.plaintext}",
            },
            status=status.HTTP_201_CREATED,
        )


class HostListApi(APIView):
    def get(self, request: Request) -> Response:
        return Response([_host_json(h) for h in host_list_for_owner(owner=request_user(request))])


class HostDetailApi(APIView):
    """One of the owner's machines; PATCH changes its `name` or `region`."""

    def get(self, request: Request, host_id: str) -> Response:
        return Response(_host_json(_owned_host(request, host_id)))

    def patch(self, request: Request, host_id: str) -> Response:
        host = _owned_host(request, host_id)
        if not isinstance(request.data, dict):
            raise DRFValidationError({"detail": 'send a JSON object such as {"region": "eu-west"}'})
        return Response(_host_json(host_update(host=host, changes=dict(request.data))))


class HostRevokeApi(APIView):
    def post(self, request: Request, host_id: str) -> Response:
        host = _owned_host(request, host_id)
        return Response(_host_json(host_token_revoke(host=host)))


class AgentEnrollApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    class InputSerializer(serializers.Serializer):
        token = serializers.CharField(max_length=200)
        name = serializers.CharField(max_length=100)

    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        enrolled = host_enroll(
            enrollment_token=data.validated_data["token"], name=data.validated_data["name"]
        )
        return Response(
            {"host_id": str(enrolled.host.pk), "host_token": enrolled.host_token},
            status=status.HTTP_201_CREATED,
        )


def _owned_host(request: Request, host_id: str) -> Host:
    try:
        key = uuid.UUID(host_id)
    except ValueError as exc:
        raise Http404("no such machine") from exc
    return get_object_or_404(host_list_for_owner(owner=request_user(request)), pk=key)


class HostPolicyApi(APIView):
    """The owner's energy policy for one machine; a change is pushed to the live agent."""

    def get(self, request: Request, host_id: str) -> Response:
        return Response(host_policy(host=_owned_host(request, host_id)).model_dump(mode="json"))

    def put(self, request: Request, host_id: str) -> Response:
        host = _owned_host(request, host_id)
        if not isinstance(request.data, dict):
            raise DRFValidationError({"detail": "send a JSON object of policy fields"})
        try:
            policy = host_policy_update(host=host, changes=dict(request.data))
        except PydanticValidationError as exc:
            raise DRFValidationError(pydantic_errors_by_field(exc)) from exc
        return Response(policy.model_dump(mode="json"))

    patch = put


class HostReliabilityApi(APIView):
    """The machine's reliability score, its parts, strikes with evidence, and every change's reason."""

    def get(self, request: Request, host_id: str) -> Response:
        return Response(host_reliability(host=_owned_host(request, host_id)))


class HostPowerApi(APIView):
    """Power history in buckets: minute resolution for two days, hourly after that."""

    def get(self, request: Request, host_id: str) -> Response:
        host = _owned_host(request, host_id)
        try:
            hours = float(request.query_params.get("hours", "24"))
        except ValueError as exc:
            raise DRFValidationError({"hours": ["hours must be a number"]}) from exc
        if not 0 < hours <= 24 * 400:
            raise DRFValidationError({"hours": ["hours must be between 0 and 9600"]})
        since = timezone.now() - timedelta(hours=hours)
        return Response(
            [
                {
                    "start": sample.bucket_start,
                    "resolution_s": sample.resolution_s,
                    "samples": sample.samples,
                    **{meter: sample.average(meter) for meter in METERS},
                }
                for sample in power_history(host=host, since=since)
            ]
        )
