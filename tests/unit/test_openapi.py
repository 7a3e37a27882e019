"""The served OpenAPI schema and OPTIONS: the configured limits are in the schema, every method is allowed."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app


def test_options_lists_every_method_of_the_path() -> None:
    with TestClient(create_app()) as client:
        jobs = client.options("/v1/jobs")
        assert jobs.status_code == 204 and jobs.headers["allow"] == "GET, HEAD, OPTIONS, POST"
        assert client.options("/v1/jobs/00000000-0000-0000-0000-000000000000/cancel").headers["allow"] == \
            "OPTIONS, POST"
        assert client.options("/no/such/path").status_code == 404


def test_the_schema_carries_the_configured_limits_and_the_bad_body_answer() -> None:
    with TestClient(create_app()) as client:
        schema = client.get("/openapi.json").json()
    job = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert job["steps"]["maximum"] == 150 and job["width"]["multipleOf"] == 8 and job["batch_size"]["maximum"] == 8
    webui = schema["components"]["schemas"]["Img2ImgBody"]
    assert "init_images" in webui["required"] and webui["properties"]["steps"]["maximum"] == 150
    post = schema["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"202", "400", "422"} <= set(post)
    assert {"404", "409"} <= set(schema["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"])
