"""A bounded fuzzer over the farm's OpenAPI schema (schemathesis): no input, valid or not, makes a server error.

The gateway runs alone against real PostgreSQL and Redis (no worker: jobs stay queued, nothing renders), with
webhooks limited to a loopback sink (``RENDERFARM_WEBHOOK_ONLY_HOSTS``), so generated ``webhook_url`` values are
refused before any DNS lookup and the run sends nothing beyond loopback. Every operation gets a few positive and
negative examples (``RENDERFARM_FUZZ_EXAMPLES`` each, default 6), as a user key, and as the admin key for admin
routes. The WebUI API's txt2img/img2img wait for their job: with no worker they answer 504 after one second,
which is their documented answer, not a server error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import ADMIN_KEY, _fresh_database, farm_env, make_key
from tests.farm_harness import Farm, start_api

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("RENDERFARM_FUZZ_EXAMPLES", "6"))
WAITING_ROUTES = {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}


@pytest.fixture(scope="module")
def gateway(postgres: Any, redis_db_url: Callable[[], str], models_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    logs = tmp_path_factory.mktemp("fuzz")
    env = farm_env(database_url=_fresh_database(postgres, "farm_fuzz"), redis_url=redis_db_url(),
                   storage_url=str(logs / "objects"), models_dir=models_dir, admin_key=ADMIN_KEY,
                   RENDERFARM_WEBHOOK_ONLY_HOSTS="127.0.0.1", RENDERFARM_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
                   RENDERFARM_SDAPI_TIMEOUT="1")
    api, base_url = start_api(env, logs)
    farm = Farm(base_url=base_url, admin_key=ADMIN_KEY, env=env, procs=[api])
    try:
        yield farm
    finally:
        farm.stop()


def _server_error(path: str, status: int) -> bool:
    return status >= 500 and not (status == 504 and path in WAITING_ROUTES)


Visit = Callable[[Any, Any, Any], None]  # (operation, case, response)


def _examples(operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], visit: Visit) -> None:
    """Up to EXAMPLES generated requests for one operation in one mode; each response goes to ``visit``."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def call(case: Any) -> None:
        visit(operation, case, case.call(base_url=base_url, headers=headers, timeout=30))

    try:
        call()
    except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
        pass


def exercise(gateway: Farm, owner: str, visit: Visit) -> dict[str, Any]:
    """Every operation of the served schema, positive and negative examples, as the key the route needs."""
    raw = httpx.get(f"{gateway.base_url}/openapi.json").json()
    user = make_key(gateway.env["DATABASE_URL"], owner)
    for result in schemathesis.openapi.from_dict(raw).get_all_operations():
        operation = result.ok()
        admin = operation.path.startswith(("/v1/admin", "/admin", "/metrics")) or operation.path.endswith("/refresh") \
            or (operation.path.startswith("/v1/models/") and operation.path != "/v1/models/import")  # the model store
        # (an import as the admin would send generated URLs to DNS: as a user it is refused before any lookup)
        headers = {"Authorization": f"Bearer {ADMIN_KEY if admin else user}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _examples(operation, mode, gateway.base_url, headers, visit)
    return dict(raw)


def test_no_request_makes_a_server_error_and_the_schema_and_the_server_agree(gateway: Farm) -> None:
    """One pass over every operation, two assertions. Server errors: none. Conformance (schemathesis' checks):
    every status, content type, response body and header is documented, and what the schema calls invalid is
    refused. Left out: "schema-valid data is accepted", since what makes a job valid also depends on the farm's
    state (installed models, a job id that exists, an image's bytes), which a static schema cannot say; those
    answers (404, 422 naming the field) are documented instead."""
    failures: list[str] = []
    problems: dict[str, str] = {}
    statuses: list[int] = []

    def visit(operation: Any, case: Any, response: Any) -> None:
        statuses.append(response.status_code)
        if operation.path in WAITING_ROUTES and response.status_code == 504:
            return
        if _server_error(operation.path, response.status_code):
            failures.append(f"{operation.label} -> {response.status_code} {response.text[:200]!r}\n"
                            f"  {case.as_curl_command()[:600]}")
        try:
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        except BaseException as exc:  # noqa: BLE001 - schemathesis raises a FailureGroup of its findings
            first = next((line.strip() for line in str(exc).splitlines() if line.startswith("- ")), str(exc))
            problems.setdefault(f"{operation.label}: {first}", f"{response.status_code} {response.text[:160]}\n"
                                                                f"  {case.as_curl_command()[:400]}")

    raw = exercise(gateway, "fuzzer", visit)
    print(f"fuzzer: {len(statuses)} requests over {len(raw['paths'])} paths, {len(failures)} server errors, "
          f"{len(problems)} conformance problems")
    assert not failures, "\n".join(failures[:20])
    assert not problems, "\n".join(f"{key} -> {value}" for key, value in sorted(problems.items()))
    assert sum(200 <= status < 300 for status in statuses) >= 30, "the fuzzer hardly got past validation and auth"
    assert httpx.get(f"{gateway.base_url}/healthz").status_code == 200
