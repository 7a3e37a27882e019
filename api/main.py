"""The FastAPI gateway: thin, and it never imports torch, diffusers or worker code."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from api.admin.sampler import run_sampler
from api.routes import (
    admin,
    admin_jobs,
    catalog,
    controlnet,
    files,
    health,
    job_events,
    jobs,
    metrics,
    models,
    png_info,
    sdapi,
    styles,
    uploads,
    webhooks,
)
from shared.errors import FieldError
from shared.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.admin.admin_key:
        from shared.auth import create_api_key
        from shared.db.session import session_scope

        with session_scope() as session:
            create_api_key(session, "admin", is_admin=True, name="RENDERFARM_ADMIN_KEY", key=settings.admin.admin_key)
    async with run_sampler():  # queue samples for the admin dashboard's charts
        yield


def json_safe(value: Any) -> Any:
    """``value`` with what strict JSON cannot carry spelled out: non-finite floats as text, strings with
    lone surrogates escaped, anything else unknown as its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, dict):
        return {str(json_safe(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return json_safe(str(value))


def create_app() -> FastAPI:
    app = FastAPI(
        title="renderfarm",
        version="0.1.0",
        description="A Stable Diffusion render farm that speaks the WebUI's language.",
        lifespan=lifespan,
    )

    @app.exception_handler(FieldError)
    async def field_error_handler(request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code,
            content={"detail": [{"loc": list(exc.field), "msg": exc.message, "type": "value_error"}]},
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, with every echoed input made JSON-safe: a NaN, an Infinity or a lone surrogate in
        the request used to make the default handler itself fail with a 500."""
        return JSONResponse(status_code=422, content={"detail": json_safe(exc.errors())})

    for router in (health.router, jobs.router, job_events.router, models.router, files.router, webhooks.router,
                   uploads.router, png_info.router, styles.router, sdapi.router, controlnet.router):
        app.include_router(router)
    for router in (admin.router, admin_jobs.router, admin.page_router, metrics.router):
        app.include_router(router)
    app.include_router(catalog.router)
    app.mount("/admin/static", StaticFiles(directory=admin.PAGE_DIR), name="admin-static")
    return app


logging.basicConfig(level=logging.INFO)
app = create_app()
