"""The castore_di pytest plugin (registered through the ``pytest11`` entry point).

Fixtures, available in any project that has castore_di installed:

* ``castore_memory_container``: a :class:`~castore_di.CastoreContainer` whose ``default``
  blob and directory services live in memory; closed after the test.
* ``castore_embedded_container``: the same with the embedded on-disk store in a temporary
  directory.
* ``castore_server``: the ``grpc+http://127.0.0.1:PORT`` URL of a running ``castore serve``
  subprocess with memory services, shared by the session (use it as a ``grpc`` URL in a
  config, e.g. ``container_from_addrs(blob=castore_server)``). A server that does not come
  up within :data:`START_TIMEOUT` fails the test.

The container fixtures are async (pytest-asyncio) when pytest-asyncio is installed, so the
services are created and closed on the test's event loop; without it they are plain
fixtures closed with :meth:`~castore_di.CastoreContainer.close`. The conformance suites for
third-party backends are :mod:`castore_di.testing.blob_conformance` and
:mod:`castore_di.testing.directory_conformance`.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from castore_di.composition import CastoreContainer, load_container

__all__ = [
    "CastoreServer",
    "LISTENING",
    "MEMORY_CONFIG",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "embedded_config",
]

LISTENING = "castore serve: listening on "
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

MEMORY_CONFIG: dict[str, Any] = {
    "blobservices": {"default": {"type": "memory"}},
    "directoryservices": {"default": {"type": "memory"}},
}


def embedded_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config with the embedded store for both kinds, in data directory ``path``."""
    return {
        "blobservices": {"default": {"type": "embedded", "path": str(path)}},
        "directoryservices": {"default": {"type": "embedded", "path": str(path)}},
    }


class CastoreServer:
    """A ``castore serve`` subprocess on 127.0.0.1 with a bounded start and stop."""

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """``args`` are global options placed before ``serve`` (memory services by default)."""
        self.args = args if args is not None else ["--blob-service-addr", "memory://",
                                                   "--directory-service-addr", "memory://"]
        self.env = env
        self.address: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def url(self) -> str:
        """``grpc+http://HOST:PORT``, usable as a ``grpc`` blob or directory service URL."""
        if self.address is None:
            raise RuntimeError("castore serve is not running")
        return f"grpc+http://{self.address}"

    def start(self, timeout: float = START_TIMEOUT) -> "CastoreServer":
        """Start on a free port and wait for the listening line; fail after ``timeout`` s."""
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "castore_di.cli", *self.args, "serve", "--listen", "127.0.0.1:0", "--grace", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:  # stdout closed: the process exited
                break
            if line.startswith(LISTENING):
                self.address = line[len(LISTENING) :].strip()
                return self
        self.stop()
        raise RuntimeError(
            f"castore serve did not start within {timeout:g} s: {' '.join(cmd)}\n" + "\n".join(self.stderr[-30:])
        )

    def _pump(self, stream: IO[str], is_stdout: bool) -> None:
        for line in stream:
            if is_stdout:
                self._lines.put(line.rstrip("\n"))
            else:
                self.stderr.append(line.rstrip("\n"))
        if is_stdout:
            self._lines.put(None)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s."""
        proc, self.address = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> "CastoreServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def castore_server() -> Iterator[str]:
    """The URL of a ``castore serve`` with memory services, shared by the session."""
    with CastoreServer() as server:
        yield server.url


def _embedded_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from castore_di.composition import default_registry

    registry = default_registry()
    for kind in ("blobservices", "directoryservices"):
        if "embedded" not in registry.tags(kind):
            pytest.fail(f"the embedded {kind} type is not registered in this castore_di")
    return tmp_path_factory.mktemp("castore-embedded")


try:
    import pytest_asyncio
except ImportError:  # plain fixtures, closed on a new event loop

    @pytest.fixture
    def castore_memory_container() -> Iterator[CastoreContainer]:
        """A container with ``default`` memory blob and directory services."""
        container = load_container(MEMORY_CONFIG)
        yield container
        container.close()

    @pytest.fixture
    def castore_embedded_container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CastoreContainer]:
        """A container with ``default`` embedded services in a temporary directory."""
        container = load_container(embedded_config(_embedded_path(tmp_path_factory)))
        yield container
        container.close()

else:

    # type-ignores: the other branch defines the sync variants of the same fixtures.
    @pytest_asyncio.fixture
    async def castore_memory_container() -> AsyncIterator[CastoreContainer]:  # type: ignore[misc]
        """A container with ``default`` memory blob and directory services."""
        async with load_container(MEMORY_CONFIG) as container:
            yield container

    @pytest_asyncio.fixture
    async def castore_embedded_container(  # type: ignore[misc]
        tmp_path_factory: pytest.TempPathFactory,
    ) -> AsyncIterator[CastoreContainer]:
        """A container with ``default`` embedded services in a temporary directory."""
        async with load_container(embedded_config(_embedded_path(tmp_path_factory))) as container:
            yield container
