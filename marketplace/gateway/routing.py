from django.urls import path

from hearth_agent.protocol import WS_PATH
from marketplace.gateway.consumers import AgentConsumer

websocket_urlpatterns = [path(WS_PATH.lstrip("/"), AgentConsumer.as_asgi())]
