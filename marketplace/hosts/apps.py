from django.apps import AppConfig


class HostsConfig(AppConfig):
    name = "marketplace.hosts"
    label = "hosts"
