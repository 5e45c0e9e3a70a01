"""Bearer-token authentication with scopes: no or unknown token -> 401 (with ``WWW-Authenticate: Bearer``),
a token without the route's scope -> 403. ``admin`` implies ``read`` and ``report``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicom_node.api.services import services
from dicom_node.api.tokens import Scope

logger = logging.getLogger(__name__)

REALM = "medfinder"
bearer = HTTPBearer(auto_error=False, description="a token from `medfinder token create`")


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name (for the audit trail) and the peer address."""

    token_name: str
    client: str | None


def _challenge(error: str | None = None, scope: Scope | None = None) -> dict[str, str]:
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
    if scope:
        value += f', scope="{scope.value}"'
    return {"WWW-Authenticate": value}


def require(scope: Scope) -> Callable[..., Principal]:
    """A dependency that lets a request through only with a valid token holding ``scope``."""

    def check(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        client = request.client.host if request.client else None
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise HTTPException(401, detail="a bearer token is required", headers=_challenge())
        record = services(request).tokens.authenticate(credentials.credentials)
        if record is None:
            logger.info("event=api_auth_refused reason=unknown_token client=%s", client)
            raise HTTPException(401, detail="the token is not valid (unknown or revoked)",
                                headers=_challenge("invalid_token"))
        if not record.allows(scope):
            logger.info("event=api_auth_refused reason=scope token=%s needs=%s", record.name, scope.value)
            raise HTTPException(403, detail=f"the token {record.name!r} lacks the {scope.value!r} scope",
                                headers=_challenge("insufficient_scope", scope))
        return Principal(token_name=record.name, client=client)

    return check


Reader = Annotated[Principal, Depends(require(Scope.READ))]
Reporter = Annotated[Principal, Depends(require(Scope.REPORT))]
