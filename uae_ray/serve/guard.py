"""Request guards of the retrieval ingress: bearer token, loopback-only without one, body size while streaming.

Fails closed: a token variable that is set but empty is an error (never "no token"); without a token only loopback
clients are served unless ``allow_unauthenticated`` is set; a body is counted chunk by chunk as it arrives (an ASGI
middleware in front of FastAPI), so a chunked upload without Content-Length is cut off at the limit instead of
being read whole first. The token arrives through ``fastapi.security.HTTPBearer`` (so the OpenAPI docs show the
scheme); the check itself is a constant-time comparison of sha256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from typing import Any

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from uae_ray.config import ConfigError

#: the token dependency: ``auto_error=False`` so a missing token is this module's 401/403, not FastAPI's
bearer = HTTPBearer(auto_error=False, description="the token in the serving nodes' token_env variable")


def token_sha256_from_env(var: str) -> str | None:
    """sha256 (hex) of the bearer token in environment variable ``var``; None when it is not set.

    Raises:
        ConfigError: the variable is set but empty or blank (an empty token would otherwise mean "no auth").
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
    """Token check of one ingress replica.

    Args:
        token_sha256: sha256 of the bearer token; None: no token (loopback clients only, unless allowed).
        allow_unauthenticated: with no token, serve non-loopback clients too.
    """

    def __init__(self, token_sha256: str | None, *, allow_unauthenticated: bool) -> None:
        self.token_sha256 = token_sha256
        self.allow_unauthenticated = allow_unauthenticated

    def authorized(self, client: str, credentials: HTTPAuthorizationCredentials | None) -> bool:
        """True when the request may see more than liveness: right token, or no token and an allowed client."""
        if self.token_sha256 is None:
            return self.allow_unauthenticated or is_loopback(client)
        token = credentials.credentials.strip() if credentials is not None else ""
        given = hashlib.sha256(token.encode()).hexdigest()
        return bool(token) and hmac.compare_digest(given, self.token_sha256)

    def authorize(self, client: str, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 (token set) or 403 (no token, non-loopback client) unless :meth:`authorized`."""
        if self.authorized(client, credentials):
            return
        if self.token_sha256 is None:
            raise HTTPException(403, "no bearer token is configured: this service answers loopback clients only")
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def client_host(request: Request) -> str:
    """The peer address of ``request`` ("" when unknown: never loopback)."""
    return request.client.host if request.client else ""


class BodyLimit:
    """ASGI middleware: reads an HTTP request body chunk by chunk and answers 413 as soon as it passes the limit
    (``Content-Length`` over it: at once, before reading); otherwise hands the buffered body to the app.

    The limit is :attr:`max_body_bytes`, set per process by the ingress replica from its settings
    (:meth:`set_limit`): Serve may run a copy of the FastAPI app object, so the app's own state is not the place."""

    max_body_bytes: int = 262_144

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def set_limit(cls, max_body_bytes: int) -> None:
        """The body limit of every ingress app in this process (one ingress replica per process)."""
        cls.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BodyLimit.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(send: Any, limit: int) -> None:
        payload = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
