"""Owners place their machines in a region (and rename them); jobs that ask for a region then find them."""

from __future__ import annotations

from typing import Any

import pytest

from marketplace.hosts.models import Host
from tests.factories import HostFactory, UserFactory, api_client

pytestmark = pytest.mark.django_db


def test_an_owner_sets_the_region_and_name_of_a_machine(host: Host, host_owner: Any) -> None:
    response = api_client(host_owner).patch(
        f"/api/v1/hosts/{host.pk}", {"region": " EU-West ", "name": "attic box"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["region"] == "eu-west"
    assert response.json()["name"] == "attic box"
    host.refresh_from_db()
    assert (host.region, host.name) == ("eu-west", "attic box")
    assert api_client(host_owner).get(f"/api/v1/hosts/{host.pk}").json()["region"] == "eu-west"


def test_a_blank_region_means_the_machine_takes_work_from_any_region_only(
    host: Host, host_owner: Any
) -> None:
    Host.objects.filter(pk=host.pk).update(region="us-east")
    response = api_client(host_owner).patch(f"/api/v1/hosts/{host.pk}", {"region": ""}, format="json")
    assert response.status_code == 200
    host.refresh_from_db()
    assert host.region == ""


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"region": "eu west!"}, "region"),
        ({"region": 7}, "region"),
        ({"region": "x" * 40}, "region"),
        ({"name": ""}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"price": 3}, "price"),
    ],
)
def test_a_bad_change_is_refused_naming_the_field_and_nothing_is_stored(
    host: Host, host_owner: Any, body: dict[str, Any], field: str
) -> None:
    Host.objects.filter(pk=host.pk).update(region="eu-west")
    before = Host.objects.values("name", "region").get(pk=host.pk)
    response = api_client(host_owner).patch(
        f"/api/v1/hosts/{host.pk}", {**body, "region": body.get("region", "us-east")}, format="json"
    )
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Host.objects.values("name", "region").get(pk=host.pk) == before


def test_another_owners_machine_is_not_found(host: Host) -> None:
    stranger = UserFactory(role="host")
    HostFactory(owner=stranger)
    response = api_client(stranger).patch(f"/api/v1/hosts/{host.pk}", {"region": "eu-west"}, format="json")
    assert response.status_code == 404
    host.refresh_from_db()
    assert host.region == ""
