"""Conformance cases for the grpc backend (see tests/cases.py).

The grpc clients talk to a real ``castore serve`` subprocess (tests/servers_grpc.py) with
memory services, and with the embedded default once it exists; each test gets its own
server (an empty store), as the suites expect. There is no backdoor:
corruption on the wire is covered by tests/test_grpc_client.py with a fake servicer.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cases_base import Case
from tests.servers_grpc import grpc_backends


def _instances(backend: str) -> Any:
    def instances(request: pytest.FixtureRequest) -> dict[str, Any]:
        server = request.getfixturevalue(f"grpc_{backend}_server_fresh")
        return {"default": {"type": "grpc", "url": server.url}}

    return instances


_CASES = [Case("grpc" if b == "memory" else f"grpc-{b}", ("grpc",), _instances(b), None) for b in grpc_backends()]

BLOB_CASES: list[Case] = list(_CASES)
DIRECTORY_CASES: list[Case] = list(_CASES)
