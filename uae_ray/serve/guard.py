"""Request guards of the retrieval ingress: bearer token, loopback-only without one, body size while streaming.

Fails closed: a token variable that is set but empty is an error (never "no token"); without a token only loopback
clients are served unless ``allow_unauthenticated`` is set; a body is counted chunk by chunk as it arrives, so a
chunked upload without Content-Length is cut off at the limit instead of being read whole first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from fastapi import HTTPException, Request

from uae_ray.config import ConfigError


def token_sha256_from_env(var: str) -> str | None:
    """sha256 (hex) of the bearer token in environment variable ``var``; None when it is not set.

    Raises:
        ValueError: the variable is set but empty or blank (an empty token would otherwise mean "no auth").
    """
    token = os.environ.get(var)
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"environment variable {var} is set but empty: set a real bearer token or unset it")
    return hashlib.sha256(token.strip().encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """Token check and body limit of one ingress replica.

    Args:
        token_sha256: sha256 of the bearer token; None: no token (loopback clients only, unless allowed).
        max_body_bytes: request bodies larger than this get a 413.
        allow_unauthenticated: with no token, serve non-loopback clients too.
    """

    def __init__(self, token_sha256: str | None, max_body_bytes: int, *, allow_unauthenticated: bool) -> None:
        self.token_sha256 = token_sha256
        self.max_body_bytes = max_body_bytes
        self.allow_unauthenticated = allow_unauthenticated

    def authorized(self, request: Request) -> bool:
        """True when the request may see more than liveness: right token, or no token and an allowed client."""
        if self.token_sha256 is None:
            client = request.client.host if request.client else ""
            return self.allow_unauthenticated or is_loopback(client)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and bool(token.strip()) and hmac.compare_digest(given, self.token_sha256)

    def authorize(self, request: Request) -> None:
        """Raise 401 (token set) or 403 (no token, non-loopback client) unless :meth:`authorized`."""
        if self.authorized(request):
            return
        if self.token_sha256 is None:
            raise HTTPException(403, "no bearer token is configured: this service answers loopback clients only")
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The request body, read chunk by chunk; a 413 as soon as it passes the limit (chunked bodies too)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body larger than {limit} bytes", headers={"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)
