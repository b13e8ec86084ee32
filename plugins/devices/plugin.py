"""The devices plugin: operators list, approve and reject pairing requests, rotate and revoke.

The pairing state is the kernel's (it pairs devices during the handshake): this plugin is the
operator's window onto it, through the ``"devices"`` service the kernel provides. The
service's methods raise ``GatewayError`` themselves (404 for an unknown request or device,
403 for a rotate that would widen scopes), so the handlers here only shape answers and cut
off connections whose token stopped being valid. ``device.pair.requested`` and
``device.pair.resolved`` are kernel events, emitted by the service, so this plugin declares
none.

Unlike upstream, revoking or rotating a token also closes the connections that
authenticated with the old token (other than the caller's own), so that revocation takes
effect now and not at the device's next connect.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec

from kernel import PAIRING, Call, MethodSpec, NonEmptyStr, Params, hookimpl

__all__ = ["DevicesPlugin"]

logger = logging.getLogger(__name__)

#: ``ConnectionInfo.auth_method`` of a connection that signed in with a device token.
DEVICE_TOKEN_METHOD = "device-token"


class PairListParams(Params):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    #: The ``nextCursor`` of the previous page of paired devices.
    cursor: str | None = None


class RequestParams(Params):
    request_id: NonEmptyStr


class RotateParams(Params):
    device_id: NonEmptyStr
    role: NonEmptyStr
    #: The new token's scopes: a subset of what the device was approved for.
    scopes: list[NonEmptyStr] | None = None


class RevokeParams(Params):
    device_id: NonEmptyStr
    role: NonEmptyStr


def _registry(call: Call) -> Any:
    return call.services.lookup("devices")


def _close_token_sessions(call: Call, device_id: str, role: str, reason: str) -> int:
    """Close the connections signed in with ``device_id``'s token for ``role``."""
    closed = 0
    for info in call.services.connections.all():
        if (
            info.device_id == device_id
            and info.role == role
            and info.auth_method == DEVICE_TOKEN_METHOD
            and info.conn_id != call.connection.conn_id
            and call.services.connections.close(info.conn_id, reason)
        ):
            closed += 1
    return closed


class DevicesPlugin:
    """``device.pair.list|approve|reject`` and ``device.token.rotate|revoke`` (scope pairing)."""

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec(
                "device.pair.list",
                self.pair_list,
                PAIRING,
                PairListParams,
                description="pending pairing requests and paired devices",
            ),
            MethodSpec(
                "device.pair.approve",
                self.pair_approve,
                PAIRING,
                RequestParams,
                description="approve a pairing request",
            ),
            MethodSpec(
                "device.pair.reject",
                self.pair_reject,
                PAIRING,
                RequestParams,
                description="reject a pairing request",
            ),
            MethodSpec(
                "device.token.rotate",
                self.token_rotate,
                PAIRING,
                RotateParams,
                description="mint a new device token (may only narrow scopes)",
            ),
            MethodSpec(
                "device.token.revoke",
                self.token_revoke,
                PAIRING,
                RevokeParams,
                description="revoke a device token until it is rotated",
            ),
        ]

    async def pair_list(self, call: Call, params: PairListParams) -> dict[str, Any]:
        return await _registry(call).list_devices(limit=params.limit, cursor=params.cursor)

    async def pair_approve(self, call: Call, params: RequestParams) -> dict[str, Any]:
        return await _registry(call).approve(params.request_id)

    async def pair_reject(self, call: Call, params: RequestParams) -> dict[str, Any]:
        return await _registry(call).reject(params.request_id)

    async def token_rotate(self, call: Call, params: RotateParams) -> dict[str, Any]:
        result = await _registry(call).rotate(params.device_id, params.role, params.scopes)
        result["disconnected"] = _close_token_sessions(
            call, params.device_id, params.role, "device token rotated"
        )
        return result

    async def token_revoke(self, call: Call, params: RevokeParams) -> dict[str, Any]:
        result = await _registry(call).revoke(params.device_id, params.role)
        result["disconnected"] = _close_token_sessions(
            call, params.device_id, params.role, "device token revoked"
        )
        return result
