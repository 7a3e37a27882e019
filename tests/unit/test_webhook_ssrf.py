"""The SSRF guard refuses every non-public target, and delivery connects to the address it checked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.settings import WebhookSettings, get_settings
from shared.webhooks import ssrf
from shared.webhooks.signing import generate_secret, signed_headers
from shared.webhooks.ssrf import UnresolvableHostError, WebhookUrlError, check_webhook_url
from tests.webhook_receiver import Receiver
from worker.webhook_sender.delivery import post_signed


@pytest.fixture(autouse=True)
def _no_env_allowlist(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ssrf.ALLOW_HOSTS_ENV, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.8.9.10:8080/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("http://192.168.1.20/hook", "private"),
        ("http://172.16.0.5/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://100.64.0.1/", "not a publicly routable"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "IPv4-mapped"),
        ("http://[::ffff:8.8.8.8]/hook", "IPv4-mapped"),
        ("http://[::127.0.0.1]/hook", "IPv4-compatible"),
        ("http://[fd12:3456::1]/hook", "unique-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[2002:a00:1::1]/hook", "embedding 10.0.0.1"),
        ("http://localhost:8000/hook", "resolves to"),
        ("http://2130706433/hook", "loopback"),  # 127.0.0.1 written as one number
    ],
)
def test_non_public_targets_are_refused(url: str, reason: str) -> None:
    with pytest.raises(WebhookUrlError, match=reason):
        check_webhook_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/hook", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("example.com/hook", "http or https"),
        ("http://user:pw@8.8.8.8/hook", "credentials"),
        ("http:///hook", "name a host"),
        ("http://8.8.8.8:99999/", "invalid port"),
        ("http://8.8.8.8/a b", "spaces"),
    ],
)
def test_malformed_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(WebhookUrlError, match=message):
        check_webhook_url(url)


def test_every_resolved_address_is_checked() -> None:
    """One private answer among public ones is enough to refuse: the connection might pick it."""

    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.1.2.3"]

    with pytest.raises(WebhookUrlError, match=r"'hooks.example' resolves to 10\.1\.2\.3, which is a private"):
        check_webhook_url("https://hooks.example/x", resolver=resolver)


def test_unresolvable_host_is_its_own_error() -> None:
    with pytest.raises(UnresolvableHostError):
        check_webhook_url("http://does-not-exist.invalid/hook")


def test_public_target_keeps_name_for_host_header_and_sni() -> None:
    target = check_webhook_url("https://Hooks.Example:8443/in?x=1", resolver=lambda h, p: ["93.184.215.14"])
    assert target.hostname == "hooks.example" and target.port == 8443
    assert target.pinned_url(target.addresses[0]) == "https://93.184.215.14:8443/in?x=1"
    assert target.host_header == "hooks.example:8443" and target.sni_hostname == "hooks.example"
    literal = check_webhook_url("http://[2606:4700::1111]/")
    assert literal.pinned_url(literal.addresses[0]) == "http://[2606:4700::1111]:80/"
    assert literal.host_header == "[2606:4700::1111]" and literal.sni_hostname is None


def test_allowlist_lets_local_targets_through(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_webhook_url("http://127.0.0.1:9000/h", allow_hosts=["127.0.0.1"]).addresses[0].is_loopback
    check_webhook_url("http://10.0.0.7/h", allow_hosts=["10.0.0.0/8"])
    check_webhook_url("http://[::1]:9000/h", allow_hosts=["[::1]"])
    with pytest.raises(WebhookUrlError):
        check_webhook_url("http://10.0.0.1/h", allow_hosts=["127.0.0.1"])  # only what is listed
    monkeypatch.setenv(ssrf.ALLOW_HOSTS_ENV, "127.0.0.1, localhost")
    get_settings.cache_clear()  # a process reads its environment once
    check_webhook_url("http://127.0.0.1:9000/h")
    check_webhook_url("http://localhost:9000/h")


def test_delivery_connects_to_the_checked_address_not_a_new_dns_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that only our resolver knows: the request can reach the receiver only through the pinned address."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])
    monkeypatch.setattr(ssrf, "system_resolver", lambda host, port: next(answers))
    secret = generate_secret()
    cfg = WebhookSettings(allow_hosts=("127.0.0.1",), timeout_seconds=5)
    with Receiver().running() as receiver:
        receiver.secret = secret
        url = f"http://hooks.rebind.test:{receiver.port}/in"
        body = '{"ok":true}'
        result = post_signed(url, body, signed_headers(secret, "msg_1", body), cfg)
        assert result.status_code == 200, result.error
        [request] = receiver.received("/in")
        assert request.headers["host"] == f"hooks.rebind.test:{receiver.port}" and request.verified
        # The next lookup answers a private address (rebinding): refused before any connection.
        result = post_signed(url, body, signed_headers(secret, "msg_2", body), cfg)
        assert result.status_code is None and "10.9.9.9" in (result.error or "")
        assert len(receiver.received("/in")) == 1


def test_only_hosts_limits_targets_to_the_operators_list_before_any_lookup() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} was looked up")

    sink = check_webhook_url("http://127.0.0.1:9000/hook", allow_hosts=["127.0.0.1"], only_hosts=["127.0.0.0/8"],
                             resolver=resolver)
    assert sink.port == 9000
    for url in ("https://example.com/hook", "http://8.8.8.8/x", "http://[::1]/x"):
        with pytest.raises(WebhookUrlError, match="RENDERFARM_WEBHOOK_ONLY_HOSTS"):
            check_webhook_url(url, allow_hosts=["127.0.0.1"], only_hosts=["127.0.0.0/8"], resolver=resolver)
    named = check_webhook_url("https://hooks.example.com/x", only_hosts=["hooks.example.com"],
                              resolver=lambda host, port: ["93.184.216.34"])
    assert named.hostname == "hooks.example.com"
