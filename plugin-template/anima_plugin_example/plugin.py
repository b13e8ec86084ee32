"""The example plugin: ``example.echo`` answers with a greeting and announces that it did.

It shows the three things most plugins declare, each through one hook:

- a config section, ``[plugins.example]``, as a msgspec Struct that the kernel validates
  with the rest of the config file and hands back through ``services.config.section``;
- one method, with params the kernel validates before the handler runs (a required field
  and a bounded one) and a typed result;
- one event, declared with the scope a client needs to receive it and emitted from the
  handler.

A plugin imports from ``kernel`` (the gateway's public API) only. It never sees sockets,
frames or scope checks: the kernel answers bad params with a 400 and a caller without
``operator.read`` with a 403 before ``echo`` is ever called.
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from kernel import (
    READ,
    Call,
    ConfigSection,
    EventSpec,
    MethodSpec,
    NonEmptyStr,
    Params,
    Payload,
    hookimpl,
    invalid_request,
)

__all__ = [
    "PLUGIN_NAME",
    "EchoParams",
    "EchoResult",
    "EchoedEvent",
    "ExampleConfig",
    "ExamplePlugin",
]

logger = logging.getLogger(__name__)

#: The name the plugin is registered under (the entry point's name in pyproject.toml). The
#: kernel keys config sections by it, so the two must agree.
PLUGIN_NAME = "example"

MAX_REPEAT = 5


class ExampleConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The ``[plugins.example]`` table; keys are camelCase on disk.

    Every field has a default, so a config file that does not mention the plugin still
    starts. ``enabled`` and ``required`` belong to the kernel and never reach this Struct.
    """

    #: Put in front of every echo.
    greeting: str = "hello"
    #: The longest ``text`` that ``example.echo`` accepts, in characters.
    max_length: Annotated[int, msgspec.Meta(ge=1)] = 200


class EchoParams(Params):
    """``example.echo`` params: ``{"text": "...", "repeat": 2}``.

    ``Params`` makes the wire names camelCase and refuses unknown fields, so a typo in a
    client is a 400 naming the field rather than a silently ignored key.
    """

    text: NonEmptyStr
    repeat: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPEAT)] = 1


class EchoResult(Payload):
    """What ``example.echo`` answers."""

    text: str
    greeting: str
    length: int


class EchoedEvent(Payload):
    """The ``example.echoed`` payload: how much was echoed, not what (events fan out)."""

    length: int
    repeat: int
    ts: int


class ExamplePlugin:
    """One instance per gateway; the kernel instantiates the class it finds."""

    __version__ = "0.1.0"

    # -- declarations: plain functions returning specs, called once at start-up --------------

    @hookimpl
    def anima_config_section(self) -> ConfigSection:
        return ConfigSection(ExampleConfig)

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec(
                "example.echo",
                self.echo,
                READ,
                EchoParams,
                description="echo text back behind the configured greeting",
            )
        ]

    @hookimpl
    def anima_events(self) -> list[EventSpec]:
        return [
            EventSpec("example.echoed", READ, description="someone called example.echo"),
        ]

    # -- methods -------------------------------------------------------------------------------

    async def echo(self, call: Call, params: EchoParams) -> EchoResult:
        # Read the section on every call rather than caching it at start-up: config.set and
        # friends replace the config while the gateway runs, and this way the next call sees
        # the new values without an anima_config_changed hook.
        config: ExampleConfig = call.services.config.section(PLUGIN_NAME)
        if len(params.text) > config.max_length:
            raise invalid_request(
                f"invalid example.echo params: text is {len(params.text)} characters, longer"
                f" than plugins.{PLUGIN_NAME}.maxLength ({config.max_length})",
                field="text",
            )
        echoed = " ".join([params.text] * params.repeat)
        call.emit(
            "example.echoed",
            EchoedEvent(length=len(echoed), repeat=params.repeat, ts=call.services.clock.now_ms()),
        )
        logger.debug("conn %s: echoed %d characters", call.connection.conn_id, len(echoed))
        return EchoResult(
            text=f"{config.greeting}, {echoed}", greeting=config.greeting, length=len(echoed)
        )
