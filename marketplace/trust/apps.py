from django.apps import AppConfig


class TrustConfig(AppConfig):
    name = "marketplace.trust"
    label = "trust"
