"""Conformance cases: one per backend type, each built through the config path.

The core types' cases are here; each backend module contributes its own (tests/cases_*.py).
"""

from __future__ import annotations

from tests import cases_bigtable, cases_composition, cases_embedded, cases_grpc, cases_objectstore
from tests.cases_base import Case, MemoryBlobBackdoor, MemoryDirectoryBackdoor

__all__ = ["BLOB_CASES", "DIRECTORY_CASES", "Case"]

_CORE_BLOB_CASES: list[Case] = [
    Case("memory", ("memory",), lambda r: {"default": {"type": "memory"}}, lambda s, r: MemoryBlobBackdoor(s)),
    Case(
        "combined",
        ("combined",),
        lambda r: {
            "local": {"type": "memory"},
            "remote": "memory://",
            "default": {"type": "combined", "local": "local", "remote": "remote"},
        },
        lambda s, r: MemoryBlobBackdoor(s.local),
    ),
]

_CORE_DIRECTORY_CASES: list[Case] = [
    Case("memory", ("memory",), lambda r: {"default": {"type": "memory"}}, lambda s, r: MemoryDirectoryBackdoor(s)),
    Case(
        "cache",
        ("cache",),
        lambda r: {"default": {"type": "cache", "near": "memory://", "far": "memory://"}},
        lambda s, r: MemoryDirectoryBackdoor(s.near),
    ),
]

_MODULES = (cases_composition, cases_objectstore, cases_embedded, cases_grpc, cases_bigtable)
BLOB_CASES: list[Case] = _CORE_BLOB_CASES + [c for m in _MODULES for c in m.BLOB_CASES]
DIRECTORY_CASES: list[Case] = _CORE_DIRECTORY_CASES + [c for m in _MODULES for c in m.DIRECTORY_CASES]
