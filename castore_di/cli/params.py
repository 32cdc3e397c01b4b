"""Argument types the commands share (kept light: ``castore ls`` imports this, not the transfer code)."""

from __future__ import annotations

from typing import Any

import click

from castore_di.digests import B3Digest
from castore_di.errors import DigestError

__all__ = ["DigestParam", "DIGEST"]


class DigestParam(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click stubs
    """A digest argument: ``b3:<base64>``, 64 hex digits or base64. Bad input is a usage error."""

    name = "digest"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> B3Digest:
        if isinstance(value, B3Digest):
            return value
        try:
            return B3Digest.parse(str(value))
        except DigestError:
            text = str(value)
            shown = repr(text if len(text) <= 60 else text[:57] + "...")
            self.fail(f"{shown} is not a digest: give the BLAKE3-256 digest as b3: and 44 base64 "
                      "characters (as castore import prints it), or as 64 hex digits", param, ctx)


DIGEST = DigestParam()
