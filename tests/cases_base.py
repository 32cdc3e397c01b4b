"""Conformance case type and helpers; the cases themselves: tests/cases.py.

Conformance cases: one per backend type, each built through the config path.

A case gives the instances of its kind (``default`` is the one under test) and a backdoor
factory that reaches storage behind the API. Cases that need a server ask for its fixture
through ``request.getfixturevalue``. Adding a backend = adding one case here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from castore_di.digests import B3Digest


@attrs.frozen
class Case:
    id: str
    covers: tuple[str, ...]  # type tags this case exercises
    instances: Callable[[pytest.FixtureRequest], dict[str, Any]]
    backdoor: Callable[[Any, pytest.FixtureRequest], Any] | None = None


def flip_byte(data: bytes, rng: random.Random | None = None) -> bytes:
    """``data`` with one byte changed (the last byte of non-empty data)."""
    if not data:
        return b"\x00"
    pos = len(data) - 1 if rng is None else rng.randrange(len(data))
    return data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]


class MemoryBlobBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.detected_by = service  # served without re-hashing; its fsck finds damage

    async def corrupt(self, digest: B3Digest) -> None:
        self.service._blobs[digest] = flip_byte(self.service._blobs[digest])


class MemoryDirectoryBackdoor:
    def __init__(self, service: Any) -> None:
        self.service = service

    async def corrupt(self, digest: B3Digest) -> None:
        self.service._dirs[digest] = flip_byte(self.service._dirs[digest])


