"""The FastAPI gateway: thin, and it never imports torch, diffusers or worker code."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from api import limits
from api.admin.sampler import run_sampler
from api.openapi import farm_openapi
from api.routes import (
    admin,
    admin_jobs,
    admin_owners,
    catalog,
    controlnet,
    datasets,
    files,
    health,
    job_events,
    jobs,
    metrics,
    model_store,
    model_uploads,
    models,
    png_info,
    prompt_dictionary,
    sdapi,
    studio,
    styles,
    trainings,
    uploads,
    usage,
    webhooks,
)
from shared.errors import FieldError
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.admin.admin_key:
        from shared.auth import create_api_key
        from shared.db.session import session_scope

        with session_scope() as session:
            create_api_key(session, "admin", is_admin=True, name="RENDERFARM_ADMIN_KEY", key=settings.admin.admin_key)
    if settings.models.model_store:
        start_model_registry(settings)
    try:
        async with run_sampler():  # queue samples for the admin dashboard's charts
            yield
    finally:
        from shared.db.async_reads import close_reads
        from shared.models.store_registry import activate

        activate(None)
        await close_reads()


def start_model_registry(settings: Settings) -> None:
    """This process's lists and submission read the model store's registry beside the folder, and the folder's
    files are registered (in the background: hashing a large folder the first time takes a while)."""
    from shared.db.session import get_session_factory
    from shared.models.store_files import one_registration, register_folder
    from shared.models.store_registry import RegistryView, activate

    factory = get_session_factory()
    activate(RegistryView.of_database(settings.models.models_dir, factory))

    def register() -> None:
        try:
            with one_registration(factory, settings.models.models_dir) as first:
                if first:  # the other API processes starting with this one leave the hashing to it
                    register_folder(factory, settings.models.models_dir, None)
        except Exception:
            log.exception("registering the models folder %s failed", settings.models.models_dir)

    threading.Thread(target=register, name="register-models-folder", daemon=True).start()


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


def _untagged(loc: Any) -> list[Any]:
    """An error's location without the tag of the job body's shape (``["body", "render", "width"]`` is reported as
    ``["body", "width"]``, as it was before upscale jobs shared the route)."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "body" and parts[1] in (jobs.RENDER_TAG, jobs.UPSCALE_TAG):
        del parts[1]
    return parts


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
        errors = [{**error, "loc": _untagged(error.get("loc", ()))} for error in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": json_safe(errors)})

    for router in (health.router, jobs.router, job_events.router, models.router, model_uploads.router,
                   model_store.router, files.router, webhooks.router, uploads.router, png_info.router, styles.router,
                   sdapi.router, controlnet.router, prompt_dictionary.router, usage.router, datasets.router,
                   trainings.router):
        app.include_router(router)
    for router in (admin.router, admin_jobs.router, admin_owners.router, admin.page_router, metrics.router,
                   studio.router):
        app.include_router(router)
    app.include_router(catalog.router)
    limits.install(app)
    app.mount("/admin/static", StaticFiles(directory=admin.PAGE_DIR), name="admin-static")
    app.mount("/studio/static", StaticFiles(directory=studio.PAGE_DIR), name="studio-static")
    app.openapi = lambda: farm_openapi(app, get_settings())  # type: ignore[method-assign]

    app.add_middleware(AnswerOptions, farm=app)
    return app


class AnswerOptions:
    """``OPTIONS`` lists every method the path has (Starlette's 405 names only the first route's). Pure ASGI: as an
    ``@app.middleware("http")`` function it ran every request through Starlette's BaseHTTPMiddleware (an extra task
    and a streamed copy of each response), a tenth of a job poll's CPU (issue 20)."""

    def __init__(self, app: ASGIApp, farm: FastAPI) -> None:
        self.app = app
        self.farm = farm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        methods = allowed_methods(self.farm, scope["path"])
        response = (Response(status_code=204, headers={"Allow": ", ".join(methods)}) if methods
                    else JSONResponse({"detail": "Not Found"}, status_code=404))
        await response(scope, receive, send)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route answers at ``path`` (asked of the router itself), plus OPTIONS and HEAD with GET."""
    methods: set[str] = set()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope: dict[str, Any] = {"type": "http", "path": path, "method": method, "root_path": "", "path_params": {}}
        for route in app.router.routes:
            if route.matches(scope)[0] == Match.FULL:
                methods.add("GET" if isinstance(route, Mount) else method)  # static files: GET only
                break
    if not methods:
        return []
    methods.add("OPTIONS")
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


logging.basicConfig(level=logging.INFO)
app = create_app()
