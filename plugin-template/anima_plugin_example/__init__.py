"""An example third-party plugin for the ANIMA gateway.

The gateway loads it through the entry point ``example`` in the ``anima.plugins`` group (see
``pyproject.toml``); an embedding host may also hand ``ExamplePlugin()`` to ``open_gateway``.
"""

from .plugin import PLUGIN_NAME, EchoedEvent, EchoParams, EchoResult, ExampleConfig, ExamplePlugin

__version__ = "0.1.0"

__all__ = [
    "PLUGIN_NAME",
    "EchoParams",
    "EchoResult",
    "EchoedEvent",
    "ExampleConfig",
    "ExamplePlugin",
    "__version__",
]
