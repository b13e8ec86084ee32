"""The ``models`` service: which provider answers a run, with which key, and key rotation.

The chat plugin (or any plugin that runs turns) reaches this through
``services.lookup("models")`` and speaks plain values and the kernel's provider types only:

``await router.route(provider=None, model=None) -> dict``
    Choose the provider and model for a run. The dict holds ``provider``,
    ``displayName``, ``model``, ``keyId`` (``None`` when no key is stored) and ``reason``, a
    sentence saying why this provider answers (``"no model key is configured"`` for the
    offline default), so the caller can say plainly who answered. ``model`` may be
    ``"provider/model"``. Raises ``GatewayError`` 400 for an unknown provider and 503 for a
    provider that needs a key and has no enabled one.

``router.stream(route, messages, *, max_tokens=None, on_rotate=None)``
    An async iterator of ``kernel.TextDelta`` and one final ``StreamDone``;
    ``messages`` are ``{"role", "content"}`` dicts. Raises ``ProviderError`` as the provider
    did. With auto-rotation on, a 401/403 or 429 that arrives before any text is retried once
    on the provider's next enabled key, which becomes the active one; ``on_rotate(notice)``
    is called first with ``{"provider", "fromKeyId", "toKeyId", "reason", "status",
    "message"}``. Close the iterator (``aclosing``) or cancel it to drop the upstream stream.

Third-party providers contributed through ``anima_model_providers`` are routed exactly like
the built-in ones; their keys live in the same key store.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from kernel import (
    GatewayError,
    ModelMessage,
    ModelProvider,
    ModelRequest,
    ProviderError,
    StreamEvent,
    TextDelta,
    invalid_request,
    unavailable,
)

if TYPE_CHECKING:
    from .plugin import ProvidersPlugin

__all__ = ["ROTATING_KINDS", "ModelRouter"]

logger = logging.getLogger(__name__)

#: The failures another key may cure.
ROTATING_KINDS = frozenset({"auth", "rate_limited"})
#: Which built-in providers the default falls to, in order, when one holds an enabled key.
DEFAULT_ORDER = ("openai", "anthropic")
#: A third-party provider that names no default model of its own is asked for this one.
FALLBACK_MODEL = "default"


class ModelRouter:
    """Routes runs to providers; one per gateway, owned by ``ProvidersPlugin``."""

    def __init__(self, plugin: ProvidersPlugin) -> None:
        self._plugin = plugin

    # -- choosing --------------------------------------------------------------------------

    def providers(self) -> Mapping[str, ModelProvider]:
        """Every usable provider by name: the built-in ones, then third parties'."""
        return self._plugin.all_providers()

    def default_choice(self) -> tuple[str, str]:
        """The provider a run gets when nothing names one, and why."""
        config = self._plugin.config
        providers = self.providers()
        if config.default_provider is not None:
            return config.default_provider, "the configured default provider"
        keys = self._plugin.keys
        for name in DEFAULT_ORDER:
            if name in providers and keys.active(name) is not None:
                return name, f"the first built-in provider with an API key ({name})"
        return "offline", "no model key is configured"

    def default_model(self, provider: str) -> str:
        config = self._plugin.config
        if config.default_model and provider == self.default_choice()[0]:
            return config.default_model
        configured = self._plugin.configured_model(provider)
        if configured:
            return configured
        found = self.providers().get(provider)
        return getattr(found, "default_model", None) or FALLBACK_MODEL

    async def route(
        self, *, provider: str | None = None, model: str | None = None
    ) -> dict[str, Any]:
        await self._plugin.ready()
        providers = self.providers()
        if provider is None and model and "/" in model:
            prefix, _, rest = model.partition("/")
            # "provider/model", unless the prefix is part of a model id (OpenRouter's
            # "meta-llama/llama-3" on an OpenAI-compatible server).
            if prefix in providers and rest:
                provider, model = prefix, rest
        if provider is None:
            provider, reason = self.default_choice()
        else:
            reason = "requested"
        found = providers.get(provider)
        if found is None:
            known = ", ".join(sorted(providers))
            if reason == "requested":
                raise invalid_request(
                    f"unknown provider {provider!r} (known: {known})", field="provider"
                )
            raise unavailable(
                f"the default provider {provider!r} is not available (known: {known});"
                " fix plugins.providers.defaultProvider"
            )
        key = self._plugin.keys.active(provider)
        if found.needs_key and key is None:
            raise unavailable(
                f"provider {provider} has no enabled API key; add one with anima.providers.set",
                details={"provider": provider},
            )
        return {
            "provider": provider,
            "displayName": found.display_name,
            "model": model or self.default_model(provider),
            # A keyless server may still take a key (a local proxy with optional auth).
            "keyId": key.key_id if key is not None else None,
            "reason": reason,
        }

    # -- streaming -------------------------------------------------------------------------

    async def stream(
        self,
        route: Mapping[str, Any],
        messages: list[Mapping[str, str]],
        *,
        max_tokens: int | None = None,
        on_rotate: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        plugin = self._plugin
        name = route["provider"]
        provider = self.providers().get(name)
        if provider is None:
            raise ProviderError("unreachable", f"provider {name} is no longer available")
        key = plugin.keys.get(route["keyId"]) if route.get("keyId") else None
        if provider.needs_key and (key is None or not key.enabled):
            # The key was removed or disabled since the route was chosen; take the current one.
            key = plugin.keys.active(name)
            if key is None:
                raise ProviderError("auth", f"provider {name} has no enabled API key")
        model_messages = [
            ModelMessage(m["role"], m["content"])  # type: ignore[arg-type]
            for m in messages
        ]
        retried = False
        with plugin.using(provider):
            while True:
                request = ModelRequest(
                    model=route["model"],
                    messages=model_messages,
                    api_key=key.secret if key is not None else None,
                    max_tokens=max_tokens or plugin.config.max_tokens,
                )
                produced_text = False
                try:
                    async with aclosing(provider.stream(request)) as events:
                        async for event in events:
                            if isinstance(event, TextDelta):
                                produced_text = True
                            yield event
                    return
                except ProviderError as exc:
                    now = plugin.now_ms()
                    if key is not None:
                        await plugin.keys.record_error(key.key_id, exc.message, now_ms=now)
                    if (
                        retried
                        or produced_text
                        or key is None
                        or exc.kind not in ROTATING_KINDS
                        or not plugin.config.auto_rotate
                    ):
                        raise
                    _previous, following = await plugin.keys.rotate(
                        name, now_ms=now, away_from=key.key_id
                    )
                    if following is None or following.key_id == key.key_id:
                        raise
                    retried = True
                    notice = {
                        "provider": name,
                        "fromKeyId": key.key_id,
                        "toKeyId": following.key_id,
                        "reason": exc.kind,
                        "status": exc.status,
                        "message": exc.message,
                    }
                    logger.info(
                        "provider %s: key %s failed (%s); retrying on key %s",
                        name,
                        key.key_id,
                        exc.kind,
                        following.key_id,
                    )
                    if on_rotate is not None:
                        on_rotate(notice)
                    key = following

    async def list_models(self, provider: str) -> list[Any]:
        """One provider's model listing, with its active key; raises ``ProviderError``."""
        found = self.providers().get(provider)
        if found is None:
            raise GatewayError(404, f"unknown provider {provider!r}")
        key = self._plugin.keys.active(provider)
        return await found.list_models(key.secret if key is not None else None)
