"""The WebUI's HTTP API (``/sdapi/v1/...``) on top of the farm, so existing WebUI clients work unchanged.

Each route is a thin translation: WebUI request → farm request → an ordinary job (visible in
``/v1/jobs`` and the dashboard) → WebUI answer. Unlike the WebUI, requests are not serialized
behind a lock: each waits for its own job, and jobs run in parallel across workers.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.routes.sdapi import extras, generate, lists, options, png_info, progress, training

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi (WebUI API)"])
for _module in (generate, extras, progress, lists, options, png_info, training):
    router.include_router(_module.router)

__all__ = ["router"]
