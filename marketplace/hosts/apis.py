"""REST endpoints for GPU owners (tokens, machines) and for agents (enroll)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.shortcuts import get_object_or_404
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.authentication import request_user
from marketplace.hosts.models import Host
from marketplace.hosts.selectors import host_list_for_owner
from marketplace.hosts.services import enrollment_token_create, host_enroll, host_token_revoke


def _host_json(host: Host) -> dict[str, Any]:
    return {
        "id": str(host.pk),
        "name": host.name,
        "status": host.status,
        "ready": host.ready,
        "tasks_in_flight": getattr(host, "tasks_in_flight", None),
        "revoked": host.revoked_at is not None,
        "agent_version": host.agent_version,
        "device": host.device,
        "slots": host.slots,
        "memory_mb": host.memory_mb,
        "isolation": host.isolation,
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


class HostRevokeApi(APIView):
    def post(self, request: Request, host_id: str) -> Response:
        host = get_object_or_404(host_list_for_owner(owner=request_user(request)), pk=host_id)
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
