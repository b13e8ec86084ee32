"""The built-in model providers: offline, OpenAI-compatible and Anthropic.

Each class satisfies ``kernel.providers.ModelProvider``; the HTTP ones also have ``aclose()``
for their connection pool, and the offline one has a no-op ``aclose()`` so that a caller can
close every provider alike.
"""

from .anthropic import AnthropicProvider
from .offline import OfflineProvider
from .openai_compat import OpenAICompatibleProvider

__all__ = ["AnthropicProvider", "OfflineProvider", "OpenAICompatibleProvider"]
