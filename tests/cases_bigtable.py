"""Conformance cases for the bigtable backend (see tests/cases.py)."""

from __future__ import annotations

from typing import Any

import pytest

from castore_di.digests import B3Digest
from tests.cases_base import Case, flip_byte

BLOB_CASES: list[Case] = []


class BigtableDirectoryBackdoor:
    """Rewrites a directory's cell through the raw data API, behind the service."""

    def __init__(self, service: Any, request: pytest.FixtureRequest) -> None:
        self.service = service
        self.emulator = request.getfixturevalue("bigtable_emulator")

    async def corrupt(self, digest: B3Digest) -> None:
        from google.cloud.bigtable.data import DeleteAllFromFamily, SetCell

        table = self.emulator.data_table(self.service.table_name)
        key = digest.hex().encode()
        row = table.read_row(key)
        assert row is not None, f"no row for {digest}"
        value = row.cells[0].value
        family = self.service.family_name
        # One atomic mutation: the old cell goes, a cell with other bytes takes its place.
        table.mutate_row(key, [DeleteAllFromFamily(family), SetCell(family, key, flip_byte(value))])


def _instances(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"default": {"type": "bigtable", **request.getfixturevalue("bigtable_table")}}


DIRECTORY_CASES: list[Case] = [
    Case("bigtable", ("bigtable",), _instances, lambda s, r: BigtableDirectoryBackdoor(s, r)),
]
