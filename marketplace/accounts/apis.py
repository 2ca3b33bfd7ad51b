"""REST endpoints for sign-up and API keys."""

from __future__ import annotations

from typing import Any

from django.shortcuts import get_object_or_404
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.authentication import request_user
from marketplace.accounts.models import ApiKey, User
from marketplace.accounts.selectors import api_key_list_for_user
from marketplace.accounts.services import api_key_create, api_key_revoke, user_signup


class SignupApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    class InputSerializer(serializers.Serializer):
        email = serializers.EmailField()
        password = serializers.CharField(min_length=1, max_length=200)
        role = serializers.ChoiceField(choices=User.Role.values, default=User.Role.BUYER)

    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = user_signup(**data.validated_data)
        return Response(
            {"id": user.pk, "email": user.email, "role": user.role}, status=status.HTTP_201_CREATED
        )


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.pk,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


class ApiKeyListCreateApi(APIView):
    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=100)

    def get(self, request: Request) -> Response:
        return Response([_key_json(k) for k in api_key_list_for_user(user=request_user(request))])

    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        created = api_key_create(user=request_user(request), name=data.validated_data["name"])
        # The plaintext key appears in this response only.
        return Response(
            {**_key_json(created.api_key), "key": created.plaintext}, status=status.HTTP_201_CREATED
        )


class ApiKeyRevokeApi(APIView):
    def post(self, request: Request, key_id: int) -> Response:
        key = get_object_or_404(api_key_list_for_user(user=request_user(request)), pk=key_id)
        return Response(_key_json(api_key_revoke(api_key=key)))
