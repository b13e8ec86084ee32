"""What a message may contain before it reaches a transcript or a model.

Text is NFC-normalised so that the same words typed on two keyboards compare and count the
same; a NUL byte is refused rather than silently cut, since it usually means a client bug;
other control characters (except tab, line feed and carriage return) are stripped, as they
only garble transcripts and terminals. Attachments are checked (base64, size) and noted in
the text; the providers take text only.
"""

from __future__ import annotations

import binascii
import re
import unicodedata
from typing import Annotated

import msgspec

from kernel import GatewayError, invalid_request

__all__ = [
    "MAX_ATTACHMENT_BYTES",
    "STOP_WORDS",
    "Attachment",
    "clean_text",
    "describe_attachments",
    "is_stop_command",
]

#: Whole messages that stop the session's runs instead of starting one (B1).
STOP_WORDS = frozenset({"/stop", "stop", "esc", "abort", "wait", "exit", "interrupt"})
MAX_ATTACHMENT_BYTES = 5_000_000

# C0 and C1 controls and DEL, except TAB (09), LF (0a) and CR (0d); NUL is refused earlier.
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class Attachment(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    content: str
    type: str | None = None
    mime_type: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    file_name: Annotated[str, msgspec.Meta(max_length=500)] | None = None


def clean_text(text: str, field: str = "message") -> str:
    """``text`` NFC-normalised with control characters stripped; a NUL is a 400."""
    if "\x00" in text:
        raise invalid_request(f"{field} must not contain null bytes", field=field)
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def is_stop_command(text: str) -> bool:
    return text.strip().lower() in STOP_WORDS


def describe_attachments(attachments: list[Attachment]) -> str:
    """A line per attachment for the transcript; raises 400/413 for an unusable one."""
    lines = []
    for position, attachment in enumerate(attachments):
        field = f"attachments.{position}.content"
        try:
            data = binascii.a2b_base64(attachment.content.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise invalid_request(f"{field} is not valid base64", field=field) from None
        if len(data) > MAX_ATTACHMENT_BYTES:
            raise GatewayError(
                413,
                f"{field} is {len(data)} bytes; the limit is {MAX_ATTACHMENT_BYTES}",
                details={"field": field},
            )
        where = f"attachments.{position}"
        name = clean_text(attachment.file_name or f"attachment {position + 1}", f"{where}.fileName")
        kind = clean_text(
            attachment.mime_type or attachment.type or "application/octet-stream",
            f"{where}.mimeType",
        )
        lines.append(f"[attachment: {name} ({kind}, {len(data)} bytes)]")
    # TODO(attachments): pass images to providers that take them instead of a note.
    return "\n".join(lines)
