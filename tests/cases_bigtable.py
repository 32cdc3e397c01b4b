"""Conformance cases for the bigtable backend (see tests/cases.py)."""

from __future__ import annotations

from tests.cases_base import Case

BLOB_CASES: list[Case] = []
DIRECTORY_CASES: list[Case] = []
