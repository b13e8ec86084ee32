"""The built-in plugins, one sub-package per method category.

Each is registered through the ``anima.plugins`` entry-point group in pyproject.toml, the
same way a third-party plugin is; none imports another.
"""
