"""The FastAPI gateway: thin, and it never imports torch, diffusers or worker code."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.routes import files, health, jobs, models
from shared.errors import FieldError
from shared.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.admin_key:
        from shared.auth import create_api_key
        from shared.db.session import session_scope

        with session_scope() as session:
            create_api_key(session, "admin", is_admin=True, name="RENDERFARM_ADMIN_KEY", key=settings.admin_key)
    yield


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

    for router in (health.router, jobs.router, models.router, files.router):
        app.include_router(router)
    return app


logging.basicConfig(level=logging.INFO)
app = create_app()
