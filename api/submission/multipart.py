"""Large multipart uploads (model files, training datasets) parsed by Starlette, spooled to disk part by part.

One place for what such a route checks before parsing: the declared size (413), the content type (415), and a body
the parser cannot read (400).
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from starlette.datastructures import FormData


async def spooled_form(request: Request, max_bytes: int, max_files: int, hint: str) -> FormData:
    """The request's multipart form; ``hint`` says which parts to send (in the 415's message). The caller closes
    the form when done."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the upload is larger than {max_bytes} bytes")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=f"send multipart/form-data with {hint}")
    try:
        return await request.form(max_files=max_files, max_fields=4)
    except HTTPException:
        raise
    except Exception as exc:  # a broken multipart body
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"the multipart body could not be read: {exc}") from exc
