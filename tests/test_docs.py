"""The docs keep up with the code.

A hook added to ``kernel/hookspecs.py`` fails here until ``docs/plugins.md`` has a heading
for it that mentions its arguments; a config key added to ``kernel/config.py`` (or to the
config section of a built-in plugin: health, chat, providers, sessions) fails until
``docs/operator.md`` has a table row for it, under its table's heading, with the default the
code uses. A method or event a built-in plugin (or the kernel) declares fails until
``docs/methods.md`` has a heading or a table row for it. The sample config in the operator
guide must be one the gateway accepts, and the Python examples in the guides must at least
parse.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kernel import hookspecs
from kernel.config import KERNEL_PLUGIN_KEYS, GatewayConfig, validate_config
from kernel.plugins import build_tables, create_plugin_manager, load_plugins
from plugins.chat.config import ChatConfig
from plugins.health.plugin import HealthConfig
from plugins.providers.config import ProvidersConfig
from plugins.sessions.plugin import SessionsConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLUGIN_GUIDE = DOCS / "plugins.md"
OPERATOR_GUIDE = DOCS / "operator.md"
METHOD_REFERENCE = DOCS / "methods.md"

#: The built-in plugins' config sections, by plugin name (``[plugins.NAME]``).
PLUGIN_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "health": HealthConfig,
    "chat": ChatConfig,
    "providers": ProvidersConfig,
    "sessions": SessionsConfig,
}
#: Entry points of the built-in plugins name objects in this package.
BUILT_IN_PACKAGE = "plugins."
#: What the docs call the operator-chosen key of a table of tables (default ``KEY``).
MAP_KEY_NAMES = {"plugins.providers.prices": "MODEL"}

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def sections(path: Path) -> dict[str, str]:
    """Each heading's text (backticks removed) mapped to the text up to the next heading."""
    text = path.read_text(encoding="utf-8")
    # Headings inside code blocks are not headings: blank the blocks out first.
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = list(_HEADING.finditer(text))
    result = {}
    for here, following in zip(found, [*found[1:], None], strict=True):
        end = following.start() if following else len(text)
        result[here.group(2).replace("`", "").strip()] = text[here.end() : end]
    return result


def hookspec_names() -> list[str]:
    """Every hook specification in the kernel's contract."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(
        name
        for name, value in vars(hookspecs).items()
        if name.startswith("anima_") and inspect.isfunction(value) and hasattr(value, marker)
    )


def test_the_contract_is_found() -> None:
    # Guards the test below against passing vacuously if the detection broke.
    names = hookspec_names()
    assert {"anima_methods", "anima_events", "anima_startup", "anima_hello_snapshot"} <= set(names)


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hook_has_a_heading_in_the_plugin_guide(hook: str) -> None:
    guide = sections(PLUGIN_GUIDE)
    assert hook in guide, f"docs/plugins.md has no heading '### {hook}'"
    body = guide[hook]
    assert f"{hook}(" in body, f"docs/plugins.md: the {hook} section does not show its signature"
    for parameter in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert re.search(rf"\b{parameter}\b", body), (
            f"docs/plugins.md: the {hook} section does not mention its argument {parameter}"
        )


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _nested_table(annotation: Any) -> tuple[str, type[msgspec.Struct]] | None:
    """``("array", S)`` for ``list[S]``, ``("map", S)`` for ``dict[str, S]``, else None."""
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and _is_table(arguments[0]):
        return "array", arguments[0]
    if typing.get_origin(annotation) is dict and _is_table(arguments[1]):
        return "map", arguments[1]
    return None


def config_tables() -> Iterator[tuple[str, type[msgspec.Struct]]]:
    """Every table of the config file that the code defines, by the name in its heading.

    A table is named by its dotted path (``gateway.auth``); the heading is that in brackets.
    An array of tables is named ``[path]`` (heading ``[[path]]``), and a table of tables
    keyed by the operator's choice is named ``path."KEY"`` with KEY in capitals.
    """

    def walk(path: str, struct: type[msgspec.Struct]) -> Iterator[tuple[str, type]]:
        yield path, struct
        for field in msgspec.structs.fields(struct):
            child = f"{path}.{field.encode_name}"
            if _is_table(field.type):
                yield from walk(child, field.type)
            elif nested := _nested_table(field.type):
                kind, item = nested
                key = MAP_KEY_NAMES.get(child, "KEY")
                yield from walk(f"[{child}]" if kind == "array" else f'{child}."{key}"', item)

    yield from walk("gateway", GatewayConfig)
    for name, section in PLUGIN_SECTIONS.items():
        yield from walk(f"plugins.{name}", section)


def config_keys() -> Iterator[tuple[str, str, str]]:
    """``(table, key, default as written in the docs)`` for every leaf key."""
    for table, struct in config_tables():
        for field in msgspec.structs.fields(struct):
            if _is_table(field.type) or _nested_table(field.type):
                continue
            if field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                default = field.default
            if default is msgspec.NODEFAULT:
                shown = "required"
            else:
                shown = "unset" if default is None else json.dumps(default)
            yield table, field.encode_name, shown
    for key in sorted(KERNEL_PLUGIN_KEYS):
        yield "plugins.NAME", key, "false" if key == "required" else "true"


def test_the_config_tree_is_found() -> None:
    tables = dict(config_tables())
    assert {"gateway.auth.rateLimit", "gateway.auth.trustedProxy", "gateway.limits"} <= set(tables)
    assert {
        "plugins.chat.identity",
        "plugins.providers.openai",
        "[plugins.providers.compatible]",
        'plugins.providers.prices."MODEL"',
        "plugins.sessions",
    } <= set(tables)
    keys = set(config_keys())
    assert ("gateway.limits", "maxPayload", "8388608") in keys
    assert ("[plugins.providers.compatible]", "baseUrl", "required") in keys
    assert ("plugins.providers", "modelsTimeoutS", "15.0") in keys


@pytest.mark.parametrize(("table", "key", "default"), list(config_keys()))
def test_every_config_key_is_in_the_operator_guide(table: str, key: str, default: str) -> None:
    guide = sections(OPERATOR_GUIDE)
    heading = f"[{table}]"
    assert heading in guide, f"docs/operator.md has no heading '### `{heading}`'"
    row = re.search(rf"^\|\s*`{re.escape(key)}`\s*\|(.*)$", guide[heading], re.MULTILINE)
    assert row, f"docs/operator.md: no row for `{key}` under {heading}"
    cells = [cell.strip() for cell in row.group(1).split("|")]
    # Columns: key | type | default | meaning. The default is its first code span, or "unset".
    documented = re.search(r"`([^`]*)`", cells[1])
    shown = documented.group(1) if documented else cells[1]
    assert shown == default, (
        f"docs/operator.md: {table}.{key} default is {shown}, code has {default}"
    )


def test_the_sample_config_is_valid() -> None:
    text = OPERATOR_GUIDE.read_text(encoding="utf-8")
    block = _FENCE.search(text, text.index("## A sample"))
    assert block and block.group(1) == "toml", "the sample config is not a ```toml block"
    document = tomllib.loads(block.group(2))
    loaded = validate_config(document, PLUGIN_SECTIONS)
    assert loaded.gateway.limits.max_payload == document["gateway"]["limits"]["maxPayload"]


def declared_names() -> tuple[set[str], set[str]]:
    """The methods and events the built-in plugins and the kernel declare, as loaded by a
    real gateway from the installed entry points (third-party plugins left out)."""
    manager = create_plugin_manager()
    infos = load_plugins(manager, use_entry_points=True)
    tables = build_tables(manager, infos)
    ours = [info for info in infos if info.source.startswith(f"entry point {BUILT_IN_PACKAGE}")]
    failed = [f"{info.name}: {info.error}" for info in ours if info.state == "failed"]
    assert not failed, f"built-in plugins failed to load: {failed}"
    built_in = {info.name for info in ours}
    methods = {name for name, owner in tables.method_owner.items() if owner in built_in}
    events = {name for name, owner in tables.event_owner.items() if owner in built_in | {"kernel"}}
    return methods, events


def _documented_names(path: Path) -> set[str]:
    """Headings and the first cell of every table row, code spans unwrapped."""
    names = set(sections(path))
    for row in re.finditer(r"^\|\s*`([^`]+)`\s*\|", path.read_text(encoding="utf-8"), re.MULTILINE):
        names.add(row.group(1))
    return names


def test_the_built_in_declarations_are_found() -> None:
    # Guards the test below: the entry points must be installed (`pip install -e .`).
    methods, events = declared_names()
    assert {"health", "chat.send", "sessions.list", "anima.providers.set"} <= methods
    assert {"device.pair.list", "device.token.rotate"} <= methods
    assert {"tick", "chat.delta", "sessions.changed", "device.pair.resolved"} <= events
    assert not any(name.startswith("example.") for name in methods | events)


@pytest.mark.parametrize("kind", ["method", "event"])
def test_every_declared_name_is_in_the_method_reference(kind: str) -> None:
    methods, events = declared_names()
    documented = _documented_names(METHOD_REFERENCE)
    missing = sorted((methods if kind == "method" else events) - documented)
    assert not missing, (
        f"docs/methods.md has no heading or table row for these {kind}s: {', '.join(missing)}"
    )


@pytest.mark.parametrize("guide", ["plugins.md", "embedding.md"])
def test_python_examples_parse(guide: str) -> None:
    text = (DOCS / guide).read_text(encoding="utf-8")
    blocks = [body for language, body in _FENCE.findall(text) if language == "python"]
    assert blocks, f"docs/{guide} has no python examples"
    for body in blocks:
        # Examples may use `async with` at top level, as in a trio REPL.
        compile(body, f"docs/{guide}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
