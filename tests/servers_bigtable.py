"""Fixtures that run Google's Bigtable emulator on 127.0.0.1 for the tests.

The emulator is, in this order: ``$CBTEMULATOR``, the Google Cloud SDK's
``platform/bigtable-emulator/cbtemulator``, ``cbtemulator`` on PATH, or ``.cache/bttest``
(built by ``scripts/setup-test-servers`` from tests/support/bttest/main.go). A test that
needs the emulator fails when none can be started.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["BigtableEmulator", "find_emulator", "start_emulator"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
SDK_EMULATORS = (
    pathlib.Path("/usr/lib/google-cloud-sdk/platform/bigtable-emulator/cbtemulator"),
    pathlib.Path("/usr/share/google-cloud-sdk/platform/bigtable-emulator/cbtemulator"),
    pathlib.Path("/google-cloud-sdk/platform/bigtable-emulator/cbtemulator"),
)
PROJECT = "test-project"
INSTANCE = "test-instance"
FAMILY = "cf1"
READY_TIMEOUT = 20.0


def find_emulator() -> pathlib.Path:
    """The emulator binary to use; ``FileNotFoundError`` naming what was tried."""
    candidates: list[pathlib.Path] = []
    if os.environ.get("CBTEMULATOR"):
        candidates.append(pathlib.Path(os.environ["CBTEMULATOR"]))
    candidates.extend(SDK_EMULATORS)
    on_path = shutil.which("cbtemulator")
    if on_path:
        candidates.append(pathlib.Path(on_path))
    candidates.append(ROOT / ".cache" / "bttest")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "no Bigtable emulator found (tried " + ", ".join(str(c) for c in candidates) + "); "
        "run scripts/setup-test-servers to build .cache/bttest"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BigtableEmulator:
    """A running emulator process plus an admin client that creates tables in it."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str) -> None:
        self.proc = proc
        self.host = host
        self._names = itertools.count()
        self._admin: Any = None
        self._data: Any = None

    def _admin_instance(self) -> Any:
        if self._admin is None:
            from google.cloud.bigtable import Client

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "Connecting to Bigtable emulator"
                self._admin = Client(project=PROJECT, admin=True)  # type: ignore[no-untyped-call]
        return self._admin.instance(INSTANCE)

    def create_table(self, family: str = FAMILY) -> str:
        """A fresh table with one column family keeping one version; returns its name."""
        from google.cloud.bigtable import column_family

        name = f"t{next(self._names)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._admin_instance().table(name).create(
                column_families={family: column_family.MaxVersionsGCRule(1)}  # type: ignore[no-untyped-call]
            )
        return name

    def data_table(self, table: str) -> Any:
        """A synchronous data-API handle on ``table`` (the tests' backdoor)."""
        if self._data is None:
            from google.cloud.bigtable.data import BigtableDataClient

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._data = BigtableDataClient(project=PROJECT)
        return self._data.get_table(INSTANCE, table)

    def stop(self) -> None:
        if self._data is not None:
            self._data.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_emulator(log: pathlib.Path | None = None) -> BigtableEmulator:
    """Start the emulator on a free loopback port and wait (bounded) until it accepts connections."""
    binary = find_emulator()
    port = _free_port()
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(binary), "-host", "127.0.0.1", "-port", str(port)], stdout=out, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bigtable emulator {binary} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"bigtable emulator {binary} did not listen on port {port} within {READY_TIMEOUT}s")
            time.sleep(0.05)
    return BigtableEmulator(proc, f"127.0.0.1:{port}")


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigtableEmulator]:
    """A session-wide emulator; ``BIGTABLE_EMULATOR_HOST`` points at it while it runs."""
    emulator = start_emulator(tmp_path_factory.mktemp("bigtable") / "emulator.log")
    patch = pytest.MonkeyPatch()
    patch.setenv("BIGTABLE_EMULATOR_HOST", emulator.host)
    try:
        yield emulator
    finally:
        patch.undo()
        emulator.stop()


@pytest.fixture
def bigtable_table(bigtable_emulator: BigtableEmulator) -> dict[str, Any]:
    """Config fields of a bigtable directory service on a fresh table in the emulator."""
    return {
        "project_id": PROJECT,
        "instance_name": INSTANCE,
        "table_name": bigtable_emulator.create_table(),
        "family_name": FAMILY,
    }
