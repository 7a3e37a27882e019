"""Typed dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from shared.auth import find_api_key
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.settings import Settings, get_settings
from shared.storage.base import ObjectStore
from shared.storage.object_store import get_object_store


def db_session() -> Iterator[Session]:
    session = get_session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(db_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_object_store)]


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def require_key(request: Request, session: SessionDep) -> ApiKey:
    token = _bearer_token(request)
    key = find_api_key(session, token) if token else None
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


CurrentKey = Annotated[ApiKey, Depends(require_key)]


def require_admin(key: CurrentKey) -> ApiKey:
    if not key.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this route needs an admin API key")
    return key


AdminKey = Annotated[ApiKey, Depends(require_admin)]
