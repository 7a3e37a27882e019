"""Standard Webhooks signatures with one secret per API key.

Signing goes through the maintained `standardwebhooks` library rather than our own HMAC code, so
what we send is exactly what receivers using that library (or any port of it) verify. The secret
belongs to the API key that submitted the job: its owner fetches and rotates it over the API.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from shared.db.models import ApiKey

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def generate_secret() -> str:
    """A fresh `whsec_<base64>` secret, the format the Standard Webhooks libraries read."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def get_or_create_secret(session: Session, api_key: ApiKey) -> str:
    """The key's signing secret, created on first use (in the caller's transaction).

    The UPDATE only fills an empty column, so two first uses racing agree on one secret.
    """
    if api_key.webhook_secret:
        return api_key.webhook_secret
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == api_key.id, ApiKey.webhook_secret.is_(None))
        .values(webhook_secret=generate_secret())
    )
    secret = session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == api_key.id))
    if not secret:
        raise LookupError(f"API key {api_key.id} no longer exists")
    session.expire(api_key, ["webhook_secret"])
    return secret


def rotate_secret(session: Session, api_key: ApiKey) -> str:
    """Replace the key's secret; attempts from now on are signed with the new one (in the caller's transaction)."""
    secret = generate_secret()
    session.execute(update(ApiKey).where(ApiKey.id == api_key.id).values(webhook_secret=secret))
    session.expire(api_key, ["webhook_secret"])
    return secret


def signed_headers(secret: str, webhook_id: str, body: str, *, timestamp: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt; `body` must be sent byte for byte as signed."""
    when = (timestamp or datetime.now(UTC)).astimezone(UTC)
    signature = Webhook(secret).sign(webhook_id, when, body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }
