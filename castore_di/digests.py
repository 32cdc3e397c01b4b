"""BLAKE3 digests."""

from __future__ import annotations

import base64
import binascii
from typing import Union

import blake3

from castore_di.errors import DigestError

__all__ = ["B3Digest", "B3_LEN", "EMPTY_DIGEST", "blake3_digest"]

B3_LEN = 32


class B3Digest(bytes):
    """A 32-byte BLAKE3 digest.

    A ``bytes`` subclass, so it is hashable, ordered and usable wherever bytes are.
    Its display form is ``b3:`` followed by standard base64 with padding, as the
    reference prints digests.
    """

    __slots__ = ()

    def __new__(cls, value: Union[bytes, bytearray, memoryview]) -> "B3Digest":
        if isinstance(value, B3Digest):
            return value
        if len(value) != B3_LEN:
            raise DigestError(f"invalid digest length: {len(value)}")
        return super().__new__(cls, value)

    @classmethod
    def from_hex(cls, text: str) -> "B3Digest":
        """Parse 64 hexadecimal characters."""
        try:
            raw = bytes.fromhex(text)
        except ValueError as e:
            raise DigestError(f"invalid hex digest {text!r}") from e
        return cls(raw)

    @classmethod
    def from_b64(cls, text: str) -> "B3Digest":
        """Parse standard base64 (with or without padding, optional ``b3:`` prefix)."""
        if text.startswith("b3:"):
            text = text[3:]
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise DigestError(f"invalid base64 digest {text!r}") from e
        return cls(raw)

    @classmethod
    def parse(cls, text: str) -> "B3Digest":
        """Parse any accepted text form: ``b3:<base64>``, 64 hex characters, or base64."""
        if text.startswith("b3:"):
            return cls.from_b64(text)
        if len(text) == 2 * B3_LEN:
            return cls.from_hex(text)
        return cls.from_b64(text)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> "B3Digest":
        """The BLAKE3 digest of ``data``."""
        return blake3_digest(data)

    def b64(self) -> str:
        return base64.b64encode(self).decode("ascii")

    def __str__(self) -> str:
        return "b3:" + self.b64()

    def __repr__(self) -> str:
        return f"B3Digest({str(self)!r})"


def blake3_digest(data: bytes | bytearray | memoryview) -> B3Digest:
    """BLAKE3-256 of ``data``; releases the GIL for large inputs."""
    h = blake3.blake3(data, max_threads=1) if len(data) < (1 << 20) else blake3.blake3(data)
    return bytes.__new__(B3Digest, h.digest())


EMPTY_DIGEST = blake3_digest(b"")
