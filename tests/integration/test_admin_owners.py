"""`/v1/admin/owners` (api/routes/admin_owners.py) and `/v1/usage` through the API in this process: admin key
only, ranges checked with the field named in a 422, PUT replaces, PATCH changes what it sends, DELETE resets to
the defaults; every owner listed with its policy and its use."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import make_key
from tests.farm_harness import Farm


def _owner() -> str:
    return f"admin-owners-{uuid.uuid4().hex[:8]}"


def test_routes_need_an_admin_key(api_only: Farm) -> None:
    owner = _owner()
    user = make_key(api_only.env["DATABASE_URL"], owner)
    with api_only.anonymous() as anonymous, api_only.client(user) as c:
        assert anonymous.get("/v1/admin/owners").status_code == 401
        assert c.get("/v1/admin/owners").status_code == 403
        assert c.put(f"/v1/admin/owners/{owner}", json={"weight": 100}).status_code == 403
        assert c.patch(f"/v1/admin/owners/{owner}", json={"weight": 100}).status_code == 403
        assert c.delete(f"/v1/admin/owners/{owner}").status_code == 403


@pytest.mark.parametrize(("body", "field"), [
    ({"weight": 0}, "weight"),
    ({"weight": -1}, "weight"),
    ({"max_running": -1}, "max_running"),
    ({"max_priority": 101}, "max_priority"),  # above RENDERFARM_MAX_PRIORITY_LIMIT (100)
    ({"max_priority": -101}, "max_priority"),
    ({"rate_burst": 0}, "rate_burst"),
    ({"rate_per_second": 0}, "rate_per_second"),
    ({"images_per_day": -5}, "images_per_day"),
    ({"gpu_seconds_per_month": "lots"}, "gpu_seconds_per_month"),
    ({"speed": 11}, "speed"),  # no such field
])
def test_out_of_range_values_are_422_naming_the_field(api_only: Farm, body: dict[str, Any], field: str) -> None:
    owner = _owner()
    with api_only.client(api_only.admin_key) as admin:
        for method in (admin.put, admin.patch):
            answer = method(f"/v1/admin/owners/{owner}", json=body)
            assert answer.status_code == 422, answer.text
            assert [e["loc"] for e in answer.json()["detail"]] == [["body", field]]
        assert admin.get(f"/v1/admin/owners/{owner}").status_code == 404  # nothing was written


def test_put_patch_delete(api_only: Farm) -> None:
    owner = _owner()
    with api_only.client(api_only.admin_key) as admin:
        put = admin.put(f"/v1/admin/owners/{owner}", json={"weight": 2, "max_running": 1, "images_per_day": 50})
        assert put.status_code == 200
        policy = put.json()["policy"]
        assert (policy["weight"], policy["max_running"], policy["images_per_day"]) == (2, 1, 50)
        assert policy["overrides"] == ["images_per_day", "max_running", "weight"]
        assert policy["rate_burst"] == 10_000  # the test farm's default (tests/conftest.py)

        patched = admin.patch(f"/v1/admin/owners/{owner}", json={"max_running": 3, "images_per_day": None}).json()
        assert patched["policy"]["weight"] == 2  # kept
        assert patched["policy"]["max_running"] == 3
        assert patched["policy"]["images_per_day"] == 0  # null: back to the default (no quota)
        assert patched["policy"]["overrides"] == ["max_running", "weight"]

        replaced = admin.put(f"/v1/admin/owners/{owner}", json={"max_priority": 10}).json()
        assert replaced["policy"]["weight"] == 1.0 and replaced["policy"]["max_priority"] == 10
        assert replaced["policy"]["overrides"] == ["max_priority"]
        assert admin.get(f"/v1/admin/owners/{owner}").json() == replaced

        reset = admin.delete(f"/v1/admin/owners/{owner}")
        assert reset.status_code == 200 and reset.json()["policy"]["overrides"] == []
        assert reset.json()["policy"]["max_priority"] == 0
        assert admin.get(f"/v1/admin/owners/{owner}").status_code == 404  # no key and no policy any more


def test_list_has_every_owner_with_a_key_or_a_policy(api_only: Farm) -> None:
    with_key, with_policy = _owner(), _owner()
    key = make_key(api_only.env["DATABASE_URL"], with_key)
    with api_only.client(api_only.admin_key) as admin:
        admin.patch(f"/v1/admin/owners/{with_policy}", json={"weight": 5})
        listed = {o["owner"]: o for o in admin.get("/v1/admin/owners").json()["owners"]}
        assert admin.get(f"/v1/admin/owners/{with_key}").status_code == 200
    assert listed[with_key]["policy"]["overrides"] == [] and listed[with_key]["today"]["images"] == 0
    assert listed[with_policy]["policy"]["weight"] == 5
    # A policy change applies at once to the owner's next request (the process's policy cache is told).
    with api_only.client(api_only.admin_key) as admin:
        admin.patch(f"/v1/admin/owners/{with_key}", json={"max_queued": 7})
    with api_only.client(key) as c:
        assert c.get("/v1/usage").json()["policy"]["max_queued"] == 7


def test_usage_of_an_owner_without_jobs(api_only: Farm) -> None:
    owner = _owner()
    key = make_key(api_only.env["DATABASE_URL"], owner)
    with api_only.client(api_only.admin_key) as admin:
        admin.put(f"/v1/admin/owners/{owner}", json={"gpu_seconds_per_day": 60, "images_per_month": 500})
    with api_only.anonymous() as anonymous:
        assert anonymous.get("/v1/usage").status_code == 401
    with api_only.client(key) as c:
        usage = c.get("/v1/usage").json()
    assert usage["owner"] == owner and usage["queued"] == 0 and usage["days"] == []
    today, month = usage["today"], usage["month"]
    assert (today["gpu_seconds"], today["gpu_seconds_quota"], today["gpu_seconds_left"]) == (0, 60, 60)
    assert today["images_quota"] is None and today["images_left"] is None
    assert (month["images_quota"], month["images_left"]) == (500, 500)
    assert today["starts_at"] < today["resets_at"] <= month["resets_at"]
