"""``anima-gateway``: run the gateway, call a method, list plugins, manage devices.

Sub-commands that talk to a running gateway read the token from ``--token``, then
``ANIMA_GATEWAY_TOKEN``, then the token file in the state directory, so that an operator on
the gateway's own machine never has to copy it by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio
from trio_websocket import HandshakeError

from .auth import TOKEN_FILE_NAME
from .chat_client import run_chat
from .client import HandshakeRefused, open_client
from .config import default_state_dir
from .errors import GatewayError
from .gateway import Gateway, GatewayStartupError

__all__ = ["main"]

logger = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:18789"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anima-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("ANIMA_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start the gateway")
    run.add_argument("--config", type=Path, help="config file (default <state>/config.toml)")
    run.add_argument("--state-dir", type=Path, help="state directory (default ~/.anima)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port to listen on (default 18789)")

    call = commands.add_parser("call", help="call a method on a running gateway")
    call.add_argument("method")
    call.add_argument("--params", default="{}", help="params as a JSON object")
    _client_options(call)

    plugins = commands.add_parser("plugins", help="list the plugins found")
    plugins.add_argument("--config", type=Path)
    plugins.add_argument("--state-dir", type=Path)
    plugins.add_argument("--json", action="store_true", help="print JSON")

    _add_devices_parser(commands)

    chat = commands.add_parser("chat", help="chat with the agent on a running gateway")
    chat.add_argument("--session", default="main", help="session key (default: main)")
    _client_options(chat)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("ANIMA_GATEWAY_URL", DEFAULT_URL))
    parser.add_argument("--token", help="shared token (default: env, then the token file)")
    parser.add_argument("--password", default=os.environ.get("ANIMA_GATEWAY_PASSWORD"))
    parser.add_argument("--state-dir", type=Path)


def _describe(exc: BaseException) -> str:
    """A readable cause; trio-websocket's HandshakeError keeps its text in the context."""
    return str(exc) or str(exc.__context__ or "") or type(exc).__name__


def resolve_token(explicit: str | None, state_dir: Path | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("ANIMA_GATEWAY_TOKEN"):
        return os.environ["ANIMA_GATEWAY_TOKEN"]
    try:
        return ((state_dir or default_state_dir()) / TOKEN_FILE_NAME).read_text().strip()
    except OSError:
        return None


def _print_first_screen(gateway: Gateway) -> None:
    auth = gateway.auth
    host = gateway.config.gateway.host
    lines = [
        "ANIMA gateway " + gateway.services.info.version,
        f"  url:      ws://{host}:{gateway.port}",
        f"  auth:     {auth.mode}",
    ]
    if auth.token_file is not None:
        made = " (generated now)" if auth.token_generated else ""
        lines.append(f"  token:    in {auth.token_file}{made}")
    elif auth.mode == "token":
        lines.append("  token:    from ANIMA_GATEWAY_TOKEN or gateway.auth.token")
    lines.append(f"  state:    {gateway.state_dir}")
    lines.append(f"  config:   {gateway.config_path}")
    loaded = [i.name for i in gateway.plugin_infos if i.state == "loaded"]
    lines.append("  plugins:  " + (", ".join(loaded) or "none"))
    for info in gateway.plugin_infos:
        if info.state != "loaded":
            lines.append(f"  ({info.name}: {info.state}{': ' + info.error if info.error else ''})")
    lines.append("  try:      anima-gateway call health")
    print("\n".join(lines), flush=True)


async def _run(args: argparse.Namespace) -> int:
    gateway = Gateway(
        state_dir=args.state_dir, config_path=args.config, host=args.host, port=args.port
    )
    try:
        gateway.prepare()
    except GatewayStartupError as exc:
        print(f"anima-gateway: cannot start: {exc}", file=sys.stderr)
        return 2

    # Signals are caught from before start-up: one arriving while the gateway starts, or
    # just after its first screen, still means a graceful stop rather than a traceback
    # (SIGINT) or an abrupt death (SIGTERM).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(gateway.serve)
            except (GatewayStartupError, OSError) as exc:
                print(f"anima-gateway: cannot start: {exc}", file=sys.stderr)
                return 2
            _print_first_screen(gateway)
            async for received in signals:
                logger.info("signal %s: shutting down", signal.Signals(received).name)
                gateway.request_shutdown()
                break
    return 0


async def _call(args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print(f"anima-gateway: --params is not JSON: {exc}", file=sys.stderr)
        return 2
    token = resolve_token(args.token, args.state_dir)
    try:
        async with open_client(args.url, token=token, password=args.password) as client:
            payload = await client.call(args.method, params)
    except HandshakeRefused as exc:
        print(f"anima-gateway: connect refused: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(
            json.dumps(
                {
                    "code": exc.code,
                    "reason": exc.reason,
                    "message": exc.message,
                    "details": exc.details,
                }
            ),
            file=sys.stderr,
        )
        return 1
    except (OSError, HandshakeError) as exc:
        print(f"anima-gateway: cannot reach {args.url}: {_describe(exc)}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(payload, indent=2, ensure_ascii=False), flush=True)
    except BrokenPipeError:
        # The reader (``| head``) left early; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _plugins(args: argparse.Namespace) -> int:
    gateway = Gateway(state_dir=args.state_dir, config_path=args.config)
    try:
        gateway.prepare()
    except GatewayStartupError as exc:
        print(f"anima-gateway: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(msgspec.json.encode(gateway.plugin_infos).decode())
        return 0
    for info in gateway.plugin_infos:
        state = "enabled" if info.enabled else "disabled"
        if info.state == "failed":
            state = f"failed: {info.error}"
        print(f"{info.name} {info.version} ({state})")
        print(f"  methods: {', '.join(info.methods) or '-'}")
        print(f"  events:  {', '.join(info.events) or '-'}")
    return 0


# -- anima-gateway devices ---------------------------------------------------------------------


def _add_devices_parser(commands: Any) -> None:
    devices = commands.add_parser(
        "devices",
        help="pairing requests, paired devices and device tokens on a running gateway",
        description="IDs may be shortened to any unique prefix.",
    )
    actions = devices.add_subparsers(dest="devices_command", required=True)
    listing = actions.add_parser("list", help="pending requests and paired devices")
    listing.add_argument("--json", action="store_true", help="print the JSON payload")
    for name, what in (("approve", "approve"), ("reject", "reject")):
        action = actions.add_parser(name, help=f"{what} a pending pairing request")
        action.add_argument("request_id", metavar="ID", help="the request's id")
    rotate = actions.add_parser("rotate", help="mint a new device token (shown once)")
    rotate.add_argument("device_id", metavar="DEVICE")
    rotate.add_argument("--role", default="operator")
    rotate.add_argument("--scopes", help="comma-separated; only scopes the device was approved for")
    revoke = actions.add_parser("revoke", help="revoke a device token until it is rotated")
    revoke.add_argument("device_id", metavar="DEVICE")
    revoke.add_argument("--role", default="operator")
    for action in actions.choices.values():
        _client_options(action)


async def _devices(args: argparse.Namespace) -> int:
    """``anima-gateway devices ...``: the devices plugin's methods, for an operator's shell."""
    token = resolve_token(args.token, args.state_dir)
    command = args.devices_command
    try:
        async with open_client(
            args.url, token=token, password=args.password, scopes=("operator.pairing",)
        ) as client:
            if command == "list":
                listing = await _all_devices(client)
                if args.json:
                    print(json.dumps(listing, indent=2, ensure_ascii=False))
                else:
                    print(_describe_devices(listing))
            elif command in ("approve", "reject"):
                request_id = await _expand(client, args.request_id, "pending", "requestId")
                result = await client.call(f"device.pair.{command}", {"requestId": request_id})
                device_id = result.get("deviceId") or result["device"]["deviceId"]
                verdict = "approved" if command == "approve" else "rejected"
                print(f"{verdict} request {request_id} (device {device_id})")
            elif command == "rotate":
                params: dict[str, Any] = {
                    "deviceId": await _expand(client, args.device_id, "paired", "deviceId"),
                    "role": args.role,
                }
                if args.scopes is not None:
                    params["scopes"] = [s.strip() for s in args.scopes.split(",") if s.strip()]
                result = await client.call("device.token.rotate", params)
                print(f"new {result['role']} token for device {result['deviceId']}")
                print(f"  scopes: {', '.join(result['scopes']) or '(none)'}")
                print(f"  token:  {result['token']}")
                print("  (shown once: only its hash is kept; give it to the device now)")
            else:
                device_id = await _expand(client, args.device_id, "paired", "deviceId")
                result = await client.call(
                    "device.token.revoke", {"deviceId": device_id, "role": args.role}
                )
                print(f"revoked the {result['role']} token of device {result['deviceId']}")
    except HandshakeRefused as exc:
        print(f"anima-gateway: connect refused: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"anima-gateway: {exc.code} {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, HandshakeError) as exc:
        print(f"anima-gateway: cannot reach {args.url}: {_describe(exc)}", file=sys.stderr)
        return 1
    return 0


async def _all_devices(client: Any) -> dict[str, Any]:
    """Every page of ``device.pair.list``, joined."""
    listing = await client.call("device.pair.list", {"limit": 1000})
    while listing.get("nextCursor"):
        page = await client.call(
            "device.pair.list", {"limit": 1000, "cursor": listing.pop("nextCursor")}
        )
        listing["paired"].extend(page["paired"])
        listing["nextCursor"] = page.get("nextCursor")
    listing.pop("nextCursor", None)
    return listing


async def _expand(client: Any, given: str, kind: str, key: str) -> str:
    """The full id that ``given`` is a unique prefix of, or ``given`` itself."""
    listing = await _all_devices(client)
    matches = sorted({item[key] for item in listing[kind] if item[key].startswith(given)})
    if given in matches or not matches:
        return given  # an exact id, or an unknown one the gateway will answer 404 for
    if len(matches) > 1:
        raise GatewayError(400, f"{given} is ambiguous: it starts {', '.join(matches)}")
    return matches[0]


def _describe_devices(listing: dict[str, Any]) -> str:
    lines = [f"pending requests: {len(listing['pending'])}"]
    for request in listing["pending"]:
        who = request.get("displayName") or request.get("clientId") or "?"
        lines.append(
            f"  {request['requestId']}  device {request['deviceId'][:16]}  {who}"
            f"  role {request['role']}  scopes {','.join(request['scopes']) or '-'}"
            f"  from {request.get('remoteIp', '-')}  ({request['reason']})"
        )
    lines.append(f"paired devices: {len(listing['paired'])}")
    for device in listing["paired"]:
        who = device.get("displayName") or device.get("clientId") or "?"
        lines.append(
            f"  {device['deviceId']}  {who}  roles {','.join(device['roles'])}"
            f"  scopes {','.join(device['scopes']) or '-'}"
        )
        for token in device["tokens"]:
            state = "revoked" if "revokedAtMs" in token else "live"
            lines.append(
                f"    token {token['role']}: {state}, scopes {','.join(token['scopes']) or '-'}"
            )
    return "\n".join(lines)


async def _chat(args: argparse.Namespace) -> int:
    """``anima-gateway chat``: see ``kernel.chat_client``."""
    token = resolve_token(args.token, args.state_dir)
    return await run_chat(args.url, token=token, password=args.password, session=args.session)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO; a provider call per chat turn is not news.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    commands: dict[str, Any] = {
        "run": lambda: trio.run(_run, args),
        "call": lambda: trio.run(_call, args),
        "plugins": lambda: _plugins(args),
        "devices": lambda: trio.run(_devices, args),
        "chat": lambda: trio.run(_chat, args),
    }
    return commands[args.command]()


if __name__ == "__main__":
    sys.exit(main())
