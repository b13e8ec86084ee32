"""The ``[plugins.providers]`` config section: which model back ends exist and how to reach them.

Keys are not config: they live in the store (``anima.providers.set``), so that they are never
written into a file that gets copied around, and so that rotation survives a restart.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

__all__ = [
    "AnthropicConfig",
    "CompatibleEndpoint",
    "ModelPrice",
    "OpenAIConfig",
    "ProvidersConfig",
]

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
#: A provider name as callers type it: short, lower case, no path or spaces.
ProviderName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
PROVIDER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class OpenAIConfig(_Section):
    """The built-in ``openai`` provider: OpenAI itself, or any server that copies its API."""

    enabled: bool = True
    base_url: str = "https://api.openai.com/v1"
    #: The model asked for when neither the request nor the session names one.
    model: str = "gpt-4o-mini"
    #: Local servers usually take no key; then the provider is usable without one.
    needs_key: bool = True
    timeout_s: PositiveSeconds = 120.0


class AnthropicConfig(_Section):
    """The built-in ``anthropic`` provider (Messages API)."""

    enabled: bool = True
    base_url: str = "https://api.anthropic.com"
    model: str = "claude-sonnet-4-5"
    timeout_s: PositiveSeconds = 120.0


class CompatibleEndpoint(_Section):
    """A further OpenAI-compatible server under its own provider name (a local llama.cpp)."""

    name: ProviderName
    base_url: str
    model: str
    display_name: str | None = None
    needs_key: bool = False
    timeout_s: PositiveSeconds = 120.0


class ModelPrice(_Section):
    """What a model costs, in ``currency`` per million tokens."""

    input: NonNegative = 0.0
    output: NonNegative = 0.0


class ProvidersConfig(_Section):
    """``[plugins.providers]``.

    :ivar default_provider: the provider a run uses when nothing names one. Unset: the first
        built-in provider holding an enabled key, else the offline provider.
    :ivar default_model: the model for the default provider (else that provider's ``model``).
    :ivar auto_rotate: on a 401 or 429, retry a run once on the provider's next enabled key.
    :ivar prices: per-model prices, keyed ``"provider/model"`` or just ``"model"``.
    """

    default_provider: ProviderName | None = None
    default_model: str | None = None
    auto_rotate: bool = True
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    models_timeout_s: PositiveSeconds = 15.0
    currency: str = "USD"
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    anthropic: AnthropicConfig = msgspec.field(default_factory=AnthropicConfig)
    compatible: list[CompatibleEndpoint] = msgspec.field(default_factory=list)
    prices: dict[str, ModelPrice] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [endpoint.name for endpoint in self.compatible]
        for name in names:
            if name in ("offline", "openai", "anthropic"):
                raise ValueError(f"compatible endpoint name {name!r} is a built-in provider's")
            if names.count(name) > 1:
                raise ValueError(f"compatible endpoint name {name!r} is used twice")
