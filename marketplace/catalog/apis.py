"""The public catalog and the content-addressed model files agents download."""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, Http404
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_model_get_by_weights, catalog_model_list, model_file_get
from marketplace.hosts.authentication import HostTokenAuthentication


def _model_json(model: CatalogModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "task_type": model.task_type,
        "dimension": model.dimension,
        "min_memory_mb": model.min_memory_mb,
        "sha256": model.weights_sha256,
    }


class CatalogListApi(APIView):
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        return Response([_model_json(m) for m in catalog_model_list()])


class ModelManifestApi(APIView):
    """What an agent needs to fetch and verify a model, by weights digest."""

    authentication_classes = [HostTokenAuthentication]

    def get(self, request: Request, sha256: str) -> Response:
        model = catalog_model_get_by_weights(sha256=sha256)
        if model is None:
            raise Http404("no model with these weights")
        files = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in model.files.all()]
        return Response({**_model_json(model), "files": files})


class ModelFileApi(APIView):
    authentication_classes = [HostTokenAuthentication]

    def get(self, request: Request, sha256: str) -> FileResponse:
        model_file = model_file_get(sha256=sha256)
        if model_file is None:
            raise Http404("no file with this digest")
        # FileResponse closes the file when the response is done streaming.
        response = FileResponse(
            open(model_file.storage_path, "rb"),  # noqa: SIM115
            content_type="application/octet-stream",
        )
        response["Content-Length"] = str(model_file.size)
        response["ETag"] = f'"{model_file.sha256}"'
        response["Cache-Control"] = "public, max-age=31536000, immutable"
        return response
