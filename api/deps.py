"""Typed dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared.auth import API_KEY_CACHE, cached_api_key, detached_api_key
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


async def _settings() -> Settings:
    return get_settings()


async def object_store() -> ObjectStore:
    """The process's object store, without a thread hop once it exists (the first call may reach the store: a bucket
    check). The hottest routes call this and `get_settings` themselves: each dependency FastAPI solves costs a
    request about as much as a cached call's own work many times over."""
    if get_object_store.cache_info().currsize:
        return get_object_store()
    return await run_in_threadpool(get_object_store)


# Async: FastAPI runs a plain function dependency in its thread pool; these are cached calls, not worth a thread hop.
SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[ObjectStore, Depends(object_store)]


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_key(request: Request, session: SessionDep) -> ApiKey:
    """The caller's key, from the process's short-lived key cache (shared/auth.py): usually no query. When it
    did query, the read-only transaction ends here, so the session holds no pooled connection until the route
    uses it (a long-poll never does)."""
    token = _bearer_token(request)
    key = cached_api_key(session, token, get_settings().gateway.api_key_cache_seconds) if token else None
    if session.in_transaction():
        session.commit()
    if key is None:
        raise _unauthorized()
    return key


CurrentKey = Annotated[ApiKey, Depends(require_key)]


def _detached_key(token: str) -> ApiKey | None:
    with get_session_factory()() as session:
        return detached_api_key(session, token, get_settings().gateway.api_key_cache_seconds)


async def lookup_detached_key(token: str) -> ApiKey | None:
    """The key for ``token`` from the key cache on the event loop (no thread, no session), else read in a session
    of its own, closed at once; None when unknown or revoked. Detached, without `webhook_secret`: for routes that
    only need its owner, id and admin flag."""
    return API_KEY_CACHE.cached(token) or await run_in_threadpool(_detached_key, token)


async def require_cached_key(request: Request) -> ApiKey:
    """The caller's key for async routes (job polls, long-polls, SSE, submits): :func:`lookup_detached_key`."""
    token = _bearer_token(request)
    key = await lookup_detached_key(token) if token else None
    if key is None:
        raise _unauthorized()
    return key


async def require_owner(request: Request) -> str:
    """The caller's owner for a poll: from the key cache without building a row, else :func:`require_cached_key`'s."""
    token = _bearer_token(request)
    owner = API_KEY_CACHE.cached_owner(token) if token else None
    return owner if owner is not None else (await require_cached_key(request)).owner


CachedKey = Annotated[ApiKey, Depends(require_cached_key)]


def require_admin(key: CurrentKey) -> ApiKey:
    if not key.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this route needs an admin API key")
    return key


AdminKey = Annotated[ApiKey, Depends(require_admin)]
