"""Signed webhook delivery and the SSRF guard on webhook targets.

Signature: ``X-Avatar-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw request body with
WEBHOOK_SECRET. ``X-Avatar-Timestamp`` repeats the body's ``timestamp`` so a receiver can
refuse stale deliveries; the body (and so the signature) covers it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import httpx

from avatar_contracts.checks import parse_url
from runtime.errors import ValidationFailed
from runtime.settings import Settings

SIGNATURE_HEADER = "X-Avatar-Signature"
TIMESTAMP_HEADER = "X-Avatar-Timestamp"
EVENT_HEADER = "X-Avatar-Event"


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for a raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Constant-time check of a signature header (what a receiver runs)."""
    return hmac.compare_digest(sign(body, secret), header or "")


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_target(url: str, settings: Settings) -> None:
    """Refuse a webhook URL that is not http(s) or that resolves to a private/loopback/link-local address."""
    parts = parse_url(url, "webhook_url", require_host=True)
    if parts.username or parts.password:
        raise ValidationFailed("webhook_url must not carry credentials")
    if not settings.webhook_secret:
        raise ValidationFailed("webhooks are disabled on this runtime: set WEBHOOK_SECRET to enable them")
    host = parts.hostname.lower()
    if settings.webhook_allow_private or host in {h.lower() for h in settings.webhook_allowed_hosts}:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValidationFailed(f"webhook_url host {host!r} does not resolve ({exc})") from None
    for info in infos:
        address = info[4][0]
        if not _is_public(address):
            raise ValidationFailed(
                f"webhook_url host {host!r} resolves to the non-public address {address}; refused "
                "(set WEBHOOK_ALLOW_PRIVATE=true or list it in WEBHOOK_ALLOWED_HOSTS to allow it)"
            )


def deliver(url: str, body: bytes, event: str, timestamp: int, settings: Settings) -> int:
    """One signed POST; returns the status code, raises httpx errors on transport failure."""
    assert settings.webhook_secret, "check_target refuses webhooks without a secret"
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(body, settings.webhook_secret),
        TIMESTAMP_HEADER: str(timestamp),
        EVENT_HEADER: event,
        "User-Agent": "avatar-runtime-webhook/1",
    }
    # the target is re-checked at delivery: DNS may have changed since submit (rebinding)
    check_target(url, settings)
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
        return client.post(url, content=body, headers=headers).status_code
