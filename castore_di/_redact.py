"""Secrets out of everything castore prints: URLs, option values, error messages.

A value is secret when its name (a URL query parameter, an option key, a config field)
contains ``key``, ``secret``, ``token``, ``passw``, ``credential``, ``sas``, ``signature`` or
``auth``, or is ``sig`` (Azure SAS); a password in a URL's user part is secret too. Secret
values are shown as ``***``.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["MASK", "is_secret_name", "redact_url", "redact_text"]

MASK = "***"
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|sas|signature|auth|^sig$", re.IGNORECASE)
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#?\s'\"]+)=(?P<value>[^&;#?\s'\"]*)")
_USERINFO = re.compile(r"(?P<scheme>://)(?P<user>[^:/@\s'\"]*):(?P<password>[^@/\s'\"]*)@")
# Possessive runs that start only at a word's beginning keep every pattern linear in the text.
_URL = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*+://[^\s'\"]*+")
_FIELD = re.compile(
    r"(?<![^\s{(,;\[])(?P<name>['\"]?[A-Za-z0-9_.-]++['\"]?)"
    r"(?P<sep>\s*+[:=]\s*+)(?P<value>'(?:[^'\\]|\\.)*+'|\"(?:[^\"\\]|\\.)*+\"|[^\s,;)}\]'\"]++)",
)


def is_secret_name(name: str) -> bool:
    """Whether a value named ``name`` is a secret."""
    return bool(_SECRET_NAME.search(urllib.parse.unquote(name)))


def _query_value(m: re.Match[str]) -> str:
    if not is_secret_name(m.group("name")) or not m.group("value"):
        return m.group(0)
    return f"{m.group('sep')}{m.group('name')}={MASK}"


def redact_url(url: str) -> str:
    """``url`` with secret query values and the user part's password replaced by ``***``."""
    url = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", url)
    head, sep, rest = url.partition("?")
    return head + sep + _QUERY_PAIR.sub(_query_value, sep + rest)[len(sep):] if sep else url


def redact_text(text: str) -> str:
    """A message with every URL redacted and ``secret_name: value`` pairs masked."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _FIELD.sub(_field_value, text)


def _field_value(m: re.Match[str]) -> str:
    if m.group("value") in (MASK, repr(MASK)) or not _SECRET_NAME.search(m.group("name").strip("'\"")):
        return m.group(0)
    return f"{m.group('name')}{m.group('sep')}{MASK}"
