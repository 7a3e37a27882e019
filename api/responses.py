"""Error answers the routes document in the OpenAPI schema, so the schema lists every status a route returns.

Each is ``{"detail": ...}`` as FastAPI's own errors are. ``BAD_BODY`` (400, a body that is not JSON or multipart
at all) is added to every operation with a request body by :func:`api.openapi.farm_openapi`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["BAD_BODY", "CONFLICT", "FORBIDDEN", "INVALID", "NOT_FOUND", "UNSUPPORTED_MEDIA", "ErrorView"]


class ErrorView(BaseModel):
    detail: str | list[dict[str, Any]]


def _answer(description: str) -> dict[str, Any]:
    return {"model": ErrorView, "description": description}


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _answer("no such job (or not this key's)")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _answer("the job is not in a state that allows this")}
FORBIDDEN: dict[int | str, dict[str, Any]] = {403: _answer("the link's signature is invalid or has expired")}
UNSUPPORTED_MEDIA: dict[int | str, dict[str, Any]] = {415: _answer("the body is neither multipart nor JSON")}
# For routes that read their body themselves (FastAPI documents its own 422 only for bodies it parses).
INVALID: dict[int | str, dict[str, Any]] = {422: _answer("a field is invalid; detail[].loc names it")}
BAD_BODY: dict[str, Any] = {"description": "the body could not be parsed (not JSON, or broken multipart)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}}}
