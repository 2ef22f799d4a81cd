"""Per-interview client tokens: let a browser connect its media without the server's key.

``/join-interview`` (called by the web app with ``X-API-Key``) returns a token that the web
app hands to the candidate's browser. The browser presents it as ``Authorization: Bearer``
on the WebRTC signaling routes of that one interview; it is worth nothing for any other
interview or route, and it expires.

Format: ``base64url(payload) "." base64url(mac)`` (no padding), where the payload is compact
JSON ``{"callId", "exp" (unix seconds), "jti" (random id)}`` and the MAC is HMAC-SHA256 over
the encoded payload with a key derived from ``API_SECRET_KEY`` (HMAC of a fixed label), so the
API key itself never signs anything a browser sees. Tokens signed with the key derived from
``API_SECRET_KEY_PREVIOUS`` are still accepted, so rotating the key does not cut off
interviews in progress.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

_LABEL = b"synchire client token v1"
MAX_TOKEN_CHARS = 1024
"""Longer bearer values are refused before any decoding."""


class TokenError(Exception):
    """A token that does not authorise the request. ``status`` is 401 (malformed, forged,
    expired) or 403 (a valid token for another interview); ``str(err)`` says which."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says."""

    call_id: str
    expires_at: float
    """Unix time after which the token is refused."""
    token_id: str
    """Random per token (``jti``): tells one issued token from another."""


def derive_key(api_key: str) -> bytes:
    """The signing key for client tokens, derived from an API key (never the key itself)."""
    return hmac.new(api_key.encode(), _LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClientTokens:
    """Issues and verifies client tokens. ``keys[0]`` signs; every key verifies."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("ClientTokens needs at least one signing key")

    @classmethod
    def from_api_keys(cls, api_keys: Iterable[str]) -> ClientTokens:
        """Keys derived from ``Settings.api_keys()`` (current first, then previous)."""
        return cls(derive_key(k) for k in api_keys)

    def issue(self, call_id: str, ttl_s: float, *, now: float | None = None) -> tuple[str, float]:
        """A token for ``call_id`` valid for ``ttl_s`` seconds; returns (token, expires_at)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        issued = time.time() if now is None else now
        expires = int(issued + ttl_s)
        payload = {"callId": call_id, "exp": expires, "jti": secrets.token_urlsafe(9)}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac(self.keys[0], body))}", float(expires)

    def verify(self, token: str, call_id: str, *, now: float | None = None) -> TokenClaims:
        """The claims of ``token`` if it authorises ``call_id`` now; :class:`TokenError` if not."""
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenError(401, "Client token is malformed")
        body, _, mac_text = token.partition(".")
        try:
            mac = _unb64(mac_text)
        except (binascii.Error, ValueError):
            raise TokenError(401, "Client token is malformed") from None
        if not any(hmac.compare_digest(mac, self._mac(key, body)) for key in self.keys):
            raise TokenError(401, "Client token signature is invalid")
        try:
            payload = json.loads(_unb64(body))
            claims = TokenClaims(
                call_id=str(payload["callId"]),
                expires_at=float(payload["exp"]),
                token_id=str(payload.get("jti", "")),
            )
        except (binascii.Error, ValueError, TypeError, KeyError):
            raise TokenError(401, "Client token is malformed") from None
        if (time.time() if now is None else now) >= claims.expires_at:
            raise TokenError(401, "Client token has expired")
        if not hmac.compare_digest(claims.call_id.encode(), call_id.encode()):
            raise TokenError(403, "Client token is for another interview")
        return claims

    @staticmethod
    def _mac(key: bytes, body: str) -> bytes:
        return hmac.new(key, body.encode("ascii", "replace"), hashlib.sha256).digest()
