"""Names in command output: quoted for people, lossless in JSON, whatever the locale.

Human output shows a name as it is when it is valid UTF-8 of printable characters that the
output encoding can write and holds no ``"`` or ``\\``; otherwise it is quoted the way git
quotes paths: in double quotes, with ``\\n``, ``\\t``, ``\\"``, ``\\\\`` … and every other
byte as a three-digit octal escape (``"caf\\351"``). So a name never moves the cursor,
starts a terminal escape sequence or splits a listing line.

``--json`` output is ASCII (valid UTF-8 whatever the locale). A name (or path, or symlink
target) that is valid UTF-8 is a JSON string; one that is not is given twice: the field
holds the name decoded with U+FFFD for each undecodable byte (for display), and the field
with ``_b64`` appended holds the exact bytes in base64 (``"name_b64": "Y2Fm6Q=="``).
"""

from __future__ import annotations

import base64
import codecs
import os
import sys
from typing import Any

__all__ = ["quote_name", "set_name", "json_line"]

_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r",
            '"': '\\"', "\\": "\\\\"}


def _encoding() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        return "utf-8"


def _writable(ch: str, encoding: str) -> bool:
    if encoding == "utf-8" or ch.isascii():
        return True
    try:
        ch.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def quote_name(name: bytes | str, encoding: str | None = None) -> str:
    """``name`` for a terminal or a text file (see the module docs). ``str`` is taken as fsdecoded."""
    raw = os.fsencode(name) if isinstance(name, str) else name
    encoding = encoding or _encoding()
    text = raw.decode("utf-8", "surrogateescape")
    if all(ch.isprintable() and ch not in _ESCAPES and not 0xDC80 <= ord(ch) <= 0xDCFF and _writable(ch, encoding)
           for ch in text):
        return text
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte
            out.append(f"\\{ord(ch) - 0xDC00:03o}")
        elif ch.isprintable() and _writable(ch, encoding):
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
    out.append('"')
    return "".join(out)


def set_name(obj: dict[str, Any], field: str, name: bytes | str) -> dict[str, Any]:
    """Put ``name`` into a JSON object losslessly: ``field`` and, for non-UTF-8 names, ``field_b64``."""
    raw = os.fsencode(name) if isinstance(name, str) else name
    try:
        obj[field] = raw.decode("utf-8")
    except UnicodeDecodeError:
        obj[field] = raw.decode("utf-8", "replace")
        obj[f"{field}_b64"] = base64.b64encode(raw).decode("ascii")
    return obj


def json_line(obj: dict[str, Any]) -> str:
    """One JSON object, ASCII only."""
    import json  # not at start-up: only --json output needs it

    return json.dumps(obj, ensure_ascii=True)
