"""Providers: model back ends as a hook, their keys and rotation, model listings and usage.

Methods ``anima.providers.get|set|rotate``, ``models.list``, ``usage.status``,
``usage.cost``; the ``models`` service that chat runs go through.
"""

from .plugin import ProvidersPlugin

__all__ = ["ProvidersPlugin"]
