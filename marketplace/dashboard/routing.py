"""Websocket routes of the pages (the agents' route lives in marketplace.gateway.routing).

Page sockets carry the browser's session, so they check the Origin like a form checks CSRF.
"""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from marketplace.dashboard.consumers import JobProgressConsumer

websocket_urlpatterns = [
    path(
        "ws/pages/jobs/<uuid:job_id>/",
        AllowedHostsOriginValidator(AuthMiddlewareStack(JobProgressConsumer.as_asgi())),
    ),
]
