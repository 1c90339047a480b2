"""The admin routes' guard: a bearer token from GENREC_ADMIN_TOKEN; without one the routes are off."""
from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.deps import ApiError


class AdminToken:
    """The configured token, held as a sha256 digest and compared in constant time."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> None:
        """Raises 404 when admin routes are off, 401 without a bearer token, 403 with a wrong one."""
        if self._digest is None:
            raise ApiError(404, "admin routes are off: set GENREC_ADMIN_TOKEN to enable them")
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ApiError(401, "admin route: send 'Authorization: Bearer <GENREC_ADMIN_TOKEN>'",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(credentials.strip().encode()).digest()
        if not hmac.compare_digest(digest, self._digest):
            raise ApiError(403, "admin route: the bearer token is not GENREC_ADMIN_TOKEN")


async def require_admin(request: Request) -> None:
    """Route dependency: the request carries the admin bearer token."""
    token: AdminToken = request.app.state.admin_token
    token.check(request.headers.get("authorization"))


AdminDep = Annotated[None, Depends(require_admin)]
