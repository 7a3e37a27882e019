"""Every admin route and the page: 401 without a key, 403 for a non-admin key, documented in OpenAPI."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import make_key
from tests.farm_harness import Farm

GET_ROUTES = [
    "/v1/admin/queue",
    "/v1/admin/workers",
    "/v1/admin/stats?window=1h",
    "/v1/admin/jobs",
    f"/v1/admin/jobs/{uuid.uuid4()}",
    "/metrics",
]
POST_ROUTES = [
    "/v1/admin/queue/pause",
    "/v1/admin/queue/resume",
    f"/v1/admin/jobs/{uuid.uuid4()}/cancel",
    f"/v1/admin/jobs/{uuid.uuid4()}/retry",
]


@pytest.fixture(scope="module")
def user_key(api_only: Farm) -> str:
    return make_key(api_only.env["DATABASE_URL"], "not-an-admin")


@pytest.mark.parametrize("method,path", [("GET", p) for p in GET_ROUTES] + [("POST", p) for p in POST_ROUTES])
def test_admin_routes_refuse_non_admin_keys(api_only: Farm, user_key: str, method: str, path: str) -> None:
    with api_only.anonymous() as client:
        anonymous = client.request(method, path)
        non_admin = client.request(method, path, headers={"Authorization": f"Bearer {user_key}"})
        unknown = client.request(method, path, headers={"Authorization": "Bearer rf_not_a_real_key"})
    assert anonymous.status_code == 401, anonymous.text
    assert non_admin.status_code == 403, non_admin.text
    assert unknown.status_code == 401, unknown.text


def test_admin_page_refuses_non_admin_keys_and_holds_no_data(api_only: Farm, user_key: str) -> None:
    with api_only.anonymous() as client:
        non_admin = client.get("/admin", headers={"Authorization": f"Bearer {user_key}"})
        admin = client.get("/admin", headers={"Authorization": f"Bearer {api_only.admin_key}"})
        # A browser cannot send the key when it navigates: it gets the static shell with the login form.
        shell = client.get("/admin")
    assert non_admin.status_code == 403
    assert admin.status_code == 200
    assert shell.status_code == 200 and 'id="login-form"' in shell.text
    assert "frame-ancestors 'none'" in shell.headers["content-security-policy"]
    # No CDN: every script and stylesheet is served by the farm itself.
    assert "https://" not in shell.text and "http://" not in shell.text


def test_admin_assets_are_served_locally(api_only: Farm) -> None:
    with api_only.anonymous() as client:
        for path in ("/admin/static/admin.js", "/admin/static/admin.css",
                     "/admin/static/vendor/uplot/uPlot.iife.min.js", "/admin/static/vendor/uplot/LICENSE"):
            assert client.get(path).status_code == 200, path


def test_admin_routes_answer_an_admin(api_only: Farm) -> None:
    with api_only.client() as client:
        for path in GET_ROUTES[:4]:
            assert client.get(path).status_code == 200, path
        assert client.get(GET_ROUTES[4]).status_code == 404
        bad_window = client.get("/v1/admin/stats?window=forever")
    assert bad_window.status_code == 422
    assert bad_window.json()["detail"][0]["loc"] == ["query", "window"]


def test_admin_routes_are_documented(api_only: Farm) -> None:
    with api_only.anonymous() as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/admin/queue", "/v1/admin/workers", "/v1/admin/stats", "/v1/admin/queue/pause",
                 "/v1/admin/queue/resume", "/metrics"):
        assert path in paths, path
    queue_schema = paths["/v1/admin/queue"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert queue_schema["$ref"].endswith("/QueueView")
    assert {"database", "broker", "pause"} <= set(spec["components"]["schemas"]["QueueView"]["properties"])
