"""renderfarm_client/webhooks.py verifies what the farm's own signing code (shared/webhooks/signing.py) signs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from renderfarm_client import WebhookVerificationFailed, verify_webhook

from shared.webhooks.signing import generate_secret, signed_headers

pytestmark = pytest.mark.unit

BODY = json.dumps({"id": "j1", "status": "succeeded", "event": "succeeded", "sequence": 3})


def test_a_delivery_signed_by_the_farm_verifies() -> None:
    secret = generate_secret()
    headers = signed_headers(secret, "msg_1", BODY)
    assert verify_webhook(BODY.encode(), headers, secret) == json.loads(BODY)
    # header names in any case, as web frameworks hand them over
    assert verify_webhook(BODY, {k.title(): v for k, v in headers.items()}, secret)["sequence"] == 3


@pytest.mark.parametrize("tamper", ["body", "secret", "old", "missing"])
def test_anything_else_is_refused(tamper: str) -> None:
    secret = generate_secret()
    when = datetime.now(UTC) - timedelta(minutes=10) if tamper == "old" else None
    headers = signed_headers(secret, "msg_1", BODY, timestamp=when)
    body = BODY.replace("succeeded", "failed") if tamper == "body" else BODY
    if tamper == "missing":
        del headers["webhook-signature"]
    key = generate_secret() if tamper == "secret" else secret
    with pytest.raises(WebhookVerificationFailed):
        verify_webhook(body, headers, key)
