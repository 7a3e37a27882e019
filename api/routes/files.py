"""Serves images from the local-directory store behind signed, expiring URLs."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from api.deps import StoreDep
from api.responses import FORBIDDEN, NOT_FOUND
from shared.storage.local import LocalObjectStore

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/{key:path}", responses={**FORBIDDEN, **NOT_FOUND})
def get_file(key: str, expires: int, signature: str, store: StoreDep) -> FileResponse:
    if not isinstance(store, LocalObjectStore):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="this farm serves images from its object store")
    if not store.verify_signature(key, expires, signature):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="the link's signature is invalid or has expired")
    try:
        path = store.path_for(key)
    except ValueError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file") from exc
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})
