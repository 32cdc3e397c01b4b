"""Tests of the programmatic example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import castore_di
import programmatic


async def test_from_dict() -> None:
    assert await programmatic.from_dict() == {"docs/hello.txt": b"from a dict\n"}


async def test_from_urls() -> None:
    assert await programmatic.from_urls() == {"docs/hello.txt": b"from URLs\n"}


async def test_single_service() -> None:
    assert await programmatic.single_service() == b"just a blob"


async def test_dict_config_is_validated_like_yaml() -> None:
    bad = {"blobservices": {"default": {"type": "combined", "local": "nope", "remote": "memory://"}}}
    with pytest.raises(castore_di.ConfigError, match="blobservices.default.local"):
        castore_di.load_container(bad)


def test_main_runs() -> None:
    script = Path(programmatic.__file__)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    assert "from a dict: {'docs/hello.txt': b'from a dict\\n'}" in out.stdout
    assert "one service: b'just a blob'" in out.stdout
