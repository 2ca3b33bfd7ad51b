from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "marketplace.gateway"
    label = "gateway"
