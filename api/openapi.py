"""The OpenAPI schema as the server behaves: the configured limits and the 400 for a body that does not parse.

Pydantic writes the request models' static bounds; the farm's limits (``RENDERFARM_MAX_STEPS``, the largest side,
batch size and count) are settings, so they are written into the schema here, when it is first served, from the
settings this process runs with. Sizes must be multiples of 8, and a body that is not JSON (or broken multipart)
is a 400 from FastAPI before validation: both are documented for every operation they apply to.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.limits import document_limits
from api.responses import BAD_BODY, ErrorView
from shared.settings import Settings

__all__ = ["farm_openapi"]

# Request models whose sizes and counts the settings bound (the farm's and the WebUI API's).
_BOUNDED_MODELS = ("Txt2ImgRequest", "Txt2ImgBody", "Img2ImgBody")


def _bound(properties: dict[str, Any], name: str, **constraints: Any) -> None:
    field = properties.get(name)
    if field is None:
        return
    target = next((option for option in field.get("anyOf", []) if option.get("type") in ("integer", "number")),
                  field)
    target.update(constraints)


def _limits(schemas: dict[str, Any], settings: Settings) -> None:
    limits = settings.limits
    for model in _BOUNDED_MODELS:
        properties = schemas.get(model, {}).get("properties", {})
        _bound(properties, "steps", maximum=limits.max_steps)
        _bound(properties, "hr_second_pass_steps", maximum=limits.max_steps)
        _bound(properties, "batch_size", maximum=limits.max_batch_size)
        _bound(properties, "n_iter", maximum=limits.max_n_iter)
        for side in ("width", "height"):
            _bound(properties, side, maximum=limits.max_side, multipleOf=8)
        for seed_side in ("seed_resize_from_w", "seed_resize_from_h"):
            _bound(properties, seed_side, maximum=limits.max_side)
        if "init_images" in properties:
            _bound(properties, "init_images", maxItems=limits.max_batch_size)


def farm_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorView", ErrorView.model_json_schema())
    _limits(schemas, settings)
    document_limits(app, schema)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation.setdefault("responses", {}).setdefault("400", BAD_BODY)
    app.openapi_schema = schema
    return schema
