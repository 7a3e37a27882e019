"""Our signatures are what Standard Webhooks receivers verify; each API key has its own rotatable secret."""

from __future__ import annotations

import base64

import httpx
import pytest
from sqlalchemy.orm import Session
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.auth import create_api_key
from shared.settings import WebhookSettings
from shared.webhooks.signing import generate_secret, get_or_create_secret, rotate_secret, signed_headers
from tests.webhook_receiver import Receiver
from worker.webhook_sender.delivery import post_signed

BODY = '{"id":"8a3c","status":"succeeded","event":"succeeded","sequence":3}'


def test_secret_format_is_what_the_libraries_read() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert generate_secret() != secret


def test_receiver_library_accepts_our_signature_and_rejects_tampering() -> None:
    secret = generate_secret()
    headers = signed_headers(secret, "msg_abc", BODY)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert Webhook(secret).verify(BODY, headers)["sequence"] == 3
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("succeeded", "failed", 1), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, dict(headers, **{"webhook-id": "msg_other"}))
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_signed_request_over_http_verifies_and_a_tampered_one_does_not() -> None:
    secret = generate_secret()
    cfg = WebhookSettings(allow_hosts=("127.0.0.1",), timeout_seconds=5)
    with Receiver().running() as receiver:
        receiver.secret = secret
        headers = signed_headers(secret, "msg_http", BODY)
        assert post_signed(receiver.url("/ok"), BODY, headers, cfg).status_code == 200
        tampered = httpx.post(receiver.url("/tampered"), content=BODY.replace("3", "4"), headers=headers)
        assert tampered.status_code == 400
        assert [r.verified for r in receiver.requests] == [True, False]


def test_secret_per_key_created_once_and_rotated(session: Session) -> None:
    key, _ = create_api_key(session, "signer")
    other, _ = create_api_key(session, "signer")
    session.commit()
    first = get_or_create_secret(session, key)
    session.commit()
    assert get_or_create_secret(session, key) == first and key.webhook_secret == first
    assert get_or_create_secret(session, other) != first
    rotated = rotate_secret(session, key)
    session.commit()
    assert rotated != first and get_or_create_secret(session, key) == rotated
    headers = signed_headers(rotated, "msg_rot", BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(first).verify(BODY, headers)  # receivers must switch to the new secret
