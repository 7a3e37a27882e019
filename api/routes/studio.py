"""The studio: the users' page (txt2img, img2img, the prompt dictionary, live progress, a gallery).

The page is static code holding no data, served to anyone, like the admin dashboard: a browser
navigating to it cannot send a key. Its script keeps the user's API key in `sessionStorage` (this
tab only, never in a URL) and sends it as a bearer token to the `/v1` routes. `/` leads here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

PAGE_DIR = Path(__file__).resolve().parent.parent / "studio_page"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # Images come from signed URLs, which may point at an S3 server (img-src, and connect-src for "send to img2img",
    # which reads the image back); scripts and styles only from here.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
        "connect-src 'self' http: https:; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/studio")
def studio_page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/studio", status_code=307)
