"""Session keys: their shape, their canonical form, and what kind of session they name.

A key is ``global`` or ``agent:<agentId>:<rest>``. Transcripts live in SQLite, so a key never
becomes a file name here; it still reaches clients, logs and other plugins, which is why the
rules are strict: no path characters (``/``, ``\\``, ``..``), no control or format characters
(NUL included), bounded lengths. Canonicalisation makes equal keys compare equal: the ends are
stripped, the ``agent:`` prefix and the agent id are lower-cased, the rest is NFC-normalised
and otherwise kept as written; ``global`` is case-insensitive, and the bare alias ``main``
names the main session.
"""

from __future__ import annotations

import re
import unicodedata

from kernel import GatewayError

__all__ = [
    "AGENT_ID_RE",
    "DEFAULT_MAIN_KEY",
    "GLOBAL_KEY",
    "MAIN_KEY_RE",
    "MAX_REST_CHARS",
    "agent_id_of",
    "canonical_agent_id",
    "canonical_key",
    "is_cron_run_key",
    "session_kind",
]

GLOBAL_KEY = "global"
DEFAULT_MAIN_KEY = "agent:main:main"
MAX_REST_CHARS = 200
AGENT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

#: The shape of a canonical key. ``canonical_key`` is the authority (it also refuses ``..``,
#: non-ASCII control and format characters); this is for quick checks and documentation.
MAIN_KEY_RE = re.compile(
    rf"^(?:global|agent:[a-z0-9][a-z0-9_-]{{0,63}}:[^\x00-\x1f\x7f/\\]{{1,{MAX_REST_CHARS}}})$"
)

# Cc: control (NUL, ESC, DEL, C1); Cf: format (bidi overrides, zero-width) that make two keys
# look alike; Cs: lone surrogates that cannot be stored as UTF-8; Co: private use.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
_MAX_INPUT_CHARS = 4 * MAX_REST_CHARS
_CRON_RUN_RE = re.compile(r"^agent:[^:]+:cron:[^:]+:run:")


def _refuse(field: str, why: str) -> GatewayError:
    return GatewayError(400, f"invalid {field}: {why}", details={"field": field})


def canonical_agent_id(agent_id: str, *, field: str = "agentId") -> str:
    """Lower-case and check an agent id; raise a 400 naming ``field`` when it is not one."""
    candidate = agent_id.strip().lower()
    if not AGENT_ID_RE.fullmatch(candidate):
        raise _refuse(field, f"agent id {agent_id[:80]!r} must match [a-z0-9][a-z0-9_-]{{0,63}}")
    return candidate


def canonical_key(key: str, *, field: str = "sessionKey", main_key: str = DEFAULT_MAIN_KEY) -> str:
    """Validate ``key`` and return its canonical form.

    :param field: the param named in the error (``sessionKey`` for the service, ``key`` or
        ``keys.3`` for the wire methods).
    :param main_key: what the bare alias ``main`` stands for.
    :raises GatewayError: 400 ``invalid <field>: <why>`` with ``details.field``.
    """
    if not isinstance(key, str):
        raise _refuse(field, f"expected a string, got {type(key).__name__}")
    if len(key) > _MAX_INPUT_CHARS:
        raise _refuse(field, f"too long ({len(key)} characters)")
    if "\x00" in key:
        # Checked before anything else so that the message is the same whatever follows.
        raise _refuse(field, "NUL byte in session key")
    text = key.strip()
    if not text:
        raise _refuse(field, "session key is empty")
    lowered = text.lower()
    if lowered == GLOBAL_KEY:
        return GLOBAL_KEY
    if lowered == "main":
        return main_key
    if not lowered.startswith("agent:"):
        raise _refuse(
            field, f"{text[:80]!r} is not 'global' nor of the form agent:<agentId>:<rest>"
        )
    agent_part, sep, rest = text[len("agent:") :].partition(":")
    if not sep:
        raise _refuse(field, f"{text[:80]!r} has no ':<rest>' after the agent id")
    agent_id = canonical_agent_id(agent_part, field=field)
    rest = unicodedata.normalize("NFC", rest)
    _check_rest(rest, field)
    return f"agent:{agent_id}:{rest}"


def _check_rest(rest: str, field: str) -> None:
    if not rest:
        raise _refuse(field, "the part after agent:<agentId>: is empty")
    if len(rest) > MAX_REST_CHARS:
        raise _refuse(field, f"the part after the agent id is over {MAX_REST_CHARS} characters")
    if "/" in rest or "\\" in rest:
        raise _refuse(field, "session keys may not contain '/' or '\\'")
    if ".." in rest:
        raise _refuse(field, "session keys may not contain '..'")
    for char in rest:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise _refuse(field, f"control or format character U+{ord(char):04X} in session key")


def agent_id_of(canonical: str) -> str:
    """The agent a canonical key belongs to (``global`` belongs to no agent: ``""``)."""
    if canonical == GLOBAL_KEY:
        return ""
    return canonical.split(":", 2)[1]


def session_kind(canonical: str) -> str:
    """``global``, ``group`` (a group or channel conversation) or ``direct``."""
    if canonical == GLOBAL_KEY:
        return "global"
    rest = canonical.split(":", 2)[2]
    parts = rest.split(":")
    if "group" in parts or "channel" in parts:
        return "group"
    return "direct"


def is_cron_run_key(canonical: str) -> bool:
    """Keys of one cron run (``agent:x:cron:<job>:run:<id>``), left out of listings."""
    return bool(_CRON_RUN_RE.match(canonical))
