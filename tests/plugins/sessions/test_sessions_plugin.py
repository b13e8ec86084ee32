"""The sessions plugin as the kernel loads it: its entry point and its config section."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from sessions_testkit import call_error, running_gateway

from kernel import GatewayStartupError
from plugins.sessions import SessionsPlugin


def test_registered_under_the_plugin_entry_point_group() -> None:
    entries = {e.name: e for e in metadata.entry_points(group="anima.plugins")}
    assert entries["sessions"].value == "plugins.sessions:SessionsPlugin"
    assert entries["sessions"].load() is SessionsPlugin


async def test_a_configured_main_key(tmp_path: Path) -> None:
    config = '[plugins.sessions]\nmainKey = "agent:ops:home"\n'
    async with running_gateway(tmp_path, config=config) as gw, gw.client() as admin:
        assert gw.sessions.canonical_key("main") == "agent:ops:home"
        await gw.sessions.ensure("agent:ops:home")
        await gw.sessions.ensure("agent:main:main")
        error = await call_error(admin, "sessions.delete", {"key": "main"})
        assert error.message == "Cannot delete the main session (agent:ops:home)."
        # agent:main:main is an ordinary session under this config.
        assert (await admin.call("sessions.delete", {"key": "agent:main:main"}))["deleted"]


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ('mainKey = "agent:main:../x"', "plugins.sessions.mainKey"),
        ('mainKey = "nope"', "plugins.sessions.mainKey"),
        ('mainKey = "agent:main:..x"', "plugins.sessions.mainKey"),
        ('mainKey = "agent:main:zero\u200bwidth"', "plugins.sessions.mainKey"),
        ("stopRunsTimeoutMs = -1", "plugins.sessions.stopRunsTimeoutMs"),
        ("retention = 3", "plugins.sessions.retention"),
    ],
)
async def test_bad_config_stops_start_up_naming_the_key(
    tmp_path: Path, line: str, where: str
) -> None:
    with pytest.raises(GatewayStartupError) as caught:
        async with running_gateway(tmp_path, config=f"[plugins.sessions]\n{line}\n"):
            pass
    section, _, field = where.rpartition(".")
    assert section in str(caught.value) and field in str(caught.value)
