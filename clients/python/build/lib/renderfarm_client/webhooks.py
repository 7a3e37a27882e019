"""Verify a webhook the farm sent: Standard Webhooks signatures, one secret per API key (whsec_...).

The farm signs with the `standardwebhooks` library (its shared/webhooks/signing.py), so this verifies with the
same library: the ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers over the body bytes
exactly as received, and a timestamp within five minutes. Get the secret with ``Client.webhook_secret()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from renderfarm_client.errors import RenderfarmError, WebhookVerificationFailed


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> dict[str, Any]:
    """The delivery's JSON (the job as GET /v1/jobs/{id} shows it, plus ``event`` and ``sequence``) once its
    signature verifies; WebhookVerificationFailed otherwise. Pass the raw body, not re-encoded JSON."""
    try:
        from standardwebhooks import Webhook
        from standardwebhooks.webhooks import WebhookVerificationError
    except ImportError as exc:  # the optional extra
        raise RenderfarmError("webhook verification needs: pip install 'renderfarm-client[webhooks]'") from exc
    try:
        payload = Webhook(secret).verify(body, {k.lower(): v for k, v in headers.items()})
    except WebhookVerificationError as exc:
        raise WebhookVerificationFailed(f"webhook did not verify: {exc}") from exc
    if not isinstance(payload, dict):
        raise WebhookVerificationFailed("webhook body is not a JSON object")
    return payload
