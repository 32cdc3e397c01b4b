"""Conformance cases for the combinators: mirrored, sharded, readonly (see tests/cases.py).

Each runs over memory members and over embedded members (separate data directories under
pytest's ``tmp_path``). Backdoors reach the member that holds the data: mirrored reads
member 0 first, so corrupting it there must raise; a sharded store corrupts the shard its
digest lives on. ``readonly`` refuses writes, so its cases read through the readonly
instance and write to its backend (:class:`tests.cases_base.Case.writer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from castore_di.digests import B3Digest
from tests.cases_base import Case, MemoryBlobBackdoor, MemoryDirectoryBackdoor


def _embedded(request: pytest.FixtureRequest, sub: str) -> str:
    return f"embedded://{request.getfixturevalue('tmp_path') / sub}"


class _ShardBackdoor:
    """Corrupts a digest on the shard it lives on."""

    def __init__(self, service: Any, make: Callable[[Any], Any]) -> None:
        self.service = service
        self.make = make

    async def corrupt(self, digest: B3Digest) -> None:
        inner = self.make(self.service.shard(digest)[1])
        await inner.corrupt(digest)
        if hasattr(inner, "detected_by"):  # memory serves without re-hashing: its fsck finds it
            self.detected_by = inner.detected_by


def _embedded_blob(s: Any) -> Any:
    from tests.cases_embedded import EmbeddedBlobBackdoor

    return EmbeddedBlobBackdoor(s)


def _embedded_dir(s: Any) -> Any:
    from tests.cases_embedded import EmbeddedDirectoryBackdoor

    return EmbeddedDirectoryBackdoor(s)


def _members(kind_memory: Any, kind_embedded: Any) -> list[tuple[str, Callable[[pytest.FixtureRequest, int], str], Any]]:
    return [("memory", lambda r, i: "memory://", kind_memory),
            ("embedded", lambda r, i: _embedded(r, f"m{i}"), kind_embedded)]


def _cases(memory_backdoor: Any, embedded_backdoor: Any) -> list[Case]:
    out: list[Case] = []
    for label, member, backdoor in _members(memory_backdoor, embedded_backdoor):
        out.append(Case(
            f"mirrored-{label}", ("mirrored",),
            lambda r, member=member: {"default": {"type": "mirrored", "members": [member(r, 0), member(r, 1)]}},
            lambda s, r, backdoor=backdoor: backdoor(s.members[0]),
        ))
        out.append(Case(
            f"sharded-{label}", ("sharded",),
            lambda r, member=member: {"default": {"type": "sharded", "weights": {"b": 2},
                                                  "shards": {n: member(r, i) for i, n in enumerate("abc")}}},
            lambda s, r, backdoor=backdoor: _ShardBackdoor(s, backdoor),
        ))
        out.append(Case(
            f"readonly-{label}", ("readonly",),
            lambda r, member=member: {"store": member(r, 0), "default": {"type": "readonly", "backend": "store"}},
            lambda s, r, backdoor=backdoor: backdoor(s.backend),
            writer="store",
        ))
    out.append(Case(  # the URL form; a list of shards, one a URL, one a name
        "sharded-url", ("sharded",),
        lambda r: {"default": "sharded://?shard=memory://&shard=x", "x": "memory://"},
        lambda s, r: _ShardBackdoor(s, memory_backdoor),
    ))
    return out


BLOB_CASES: list[Case] = _cases(MemoryBlobBackdoor, _embedded_blob) + [
    Case("memory-bounded", ("memory",), lambda r: {"default": "memory://?max_bytes=67108864"},
         lambda s, r: MemoryBlobBackdoor(s)),
    Case(
        "combined-write-both", ("combined",),
        lambda r: {"remote": "memory://", "default": {"type": "combined", "local": _embedded(r, "local"),
                                                      "remote": "remote", "write_to": "both"}},
        lambda s, r: _embedded_blob(s.local),
    ),
    Case(
        "combined-write-remote", ("combined",),
        lambda r: {"default": {"type": "combined", "local": "memory://", "remote": "memory://", "write_to": "remote",
                               "populate_local": False}},
        lambda s, r: MemoryBlobBackdoor(s.remote),
    ),
]
BLOB_CASES.append(Case(
    "embedded-bounded", ("embedded",),
    lambda r: {"default": {"type": "embedded", "path": str(r.getfixturevalue("tmp_path") / "b"),
                           "avg_chunk_size": 65536, "max_bytes": 1 << 30}},
    lambda s, r: _embedded_blob(s),
))
DIRECTORY_CASES: list[Case] = _cases(MemoryDirectoryBackdoor, _embedded_dir) + [
    Case("memory-bounded", ("memory",), lambda r: {"default": "memory://?max_entries=100000"},
         lambda s, r: MemoryDirectoryBackdoor(s)),
]
