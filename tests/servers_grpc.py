"""Fixtures that run a real ``castore serve`` subprocess on 127.0.0.1 for the tests.

:class:`GrpcServerProcess` starts ``python -m castore_di.cli [--config FILE] serve --listen
127.0.0.1:0``, waits (bounded) for the ``castore serve: listening on ADDRESS`` line, and
stops the process at teardown. A server that does not start fails the test.

Backends: ``memory`` (a config file with memory services) and ``embedded`` (no config: the
embedded default, with its data directory in a temporary directory), the latter only once
the ``embedded`` type is registered.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castore_di.composition import default_registry

__all__ = ["GrpcServerProcess", "grpc_backends"]

LISTENING = "castore serve: listening on "
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

MEMORY_CONFIG = {
    "blobservices": {"default": {"type": "memory"}},
    "directoryservices": {"default": {"type": "memory"}},
}


def grpc_backends() -> list[str]:
    """Backends the grpc server fixtures can run: memory, and embedded when it exists."""
    registry = default_registry()
    out = ["memory"]
    if "embedded" in registry.tags("blobservices") and "embedded" in registry.tags("directoryservices"):
        out.append("embedded")
    return out


class GrpcServerProcess:
    """One ``castore serve`` subprocess; restartable on the same address."""

    def __init__(
        self,
        workdir: Path,
        backend: str = "memory",
        listen: str = "127.0.0.1:0",
        grace: float = 2.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        self.backend = backend
        self.listen = listen
        self.grace = grace
        self.address: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def url(self) -> str:
        assert self.address is not None, "server not started"
        return "grpc+http://" + self.address

    @property
    def data_dir(self) -> Path:
        """The embedded backend's data directory (platformdirs' ``$XDG_DATA_HOME/castore``)."""
        if self.backend != "embedded":
            raise ValueError(f"the {self.backend} backend has no data directory")
        return self.workdir / "data" / "castore"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "castore_di.cli"]
        if self.backend == "memory":
            config = self.workdir / "castore.json"
            config.write_text(json.dumps(MEMORY_CONFIG))
            cmd += ["--config", str(config)]
        elif self.backend == "embedded":
            env.pop("CASTORE_CONFIG", None)
            env["XDG_DATA_HOME"] = str(self.data_dir.parent)
            env["HOME"] = str(self.workdir)
        else:
            raise ValueError(f"unknown backend {self.backend!r}")
        cmd += ["serve", "--grace", str(self.grace)]
        cmd += ["--listen", self.address if self.address else self.listen, *self.extra_args]
        return cmd, env

    def _pump(self, stream: object, sink: list[str], notify: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line.rstrip("\n"))
            if notify:
                self._lines.put(line.rstrip("\n"))
        if notify:
            self._lines.put(None)

    def start(self, timeout: float = START_TIMEOUT) -> "GrpcServerProcess":
        """Start (or restart on the same address) and wait for the listening line.

        A restart whose bind fails (the killed process's port not yet released) is retried
        until the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._start_once(max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                rebind = self.address is not None and any("cannot listen" in line for line in self.stderr_lines[-5:])
                if not rebind or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _start_once(self, timeout: float) -> "GrpcServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd, env = self._command()
        self._lines = queue.Queue()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=self.workdir
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout_lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines, False), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.01, remaining))
            except queue.Empty:
                line = None
                if time.monotonic() < deadline:
                    continue
            if line is not None and line.startswith(LISTENING):
                self.address = line[len(LISTENING) :].strip()
                return self
            if line is None:
                self.kill()
                time.sleep(0.1)
                raise RuntimeError(
                    f"castore serve did not start within {timeout:g} s: {' '.join(cmd)}\n"
                    + "\n".join(self.stderr_lines[-30:])
                )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait (bounded) for the exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise RuntimeError(f"castore serve did not stop within {timeout:g} s after {sig}")
        time.sleep(0.05)  # let the pump threads collect the last lines
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _run(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[GrpcServerProcess]:
    yield from _run_in(tmp_path_factory.mktemp(f"grpc-{backend}"), backend)


def _run_in(workdir: Path, backend: str) -> Iterator[GrpcServerProcess]:
    server = GrpcServerProcess(workdir, backend).start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="session")
def grpc_memory_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServerProcess]:
    """A ``castore serve`` with memory services, shared by the session."""
    yield from _run(tmp_path_factory, "memory")


@pytest.fixture(scope="session")
def grpc_embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServerProcess]:
    """A ``castore serve`` with the embedded default services, shared by the session."""
    yield from _run(tmp_path_factory, "embedded")


@pytest.fixture
def grpc_memory_server_fresh(tmp_path: Path) -> Iterator[GrpcServerProcess]:
    """A memory-backed ``castore serve`` of the test's own (an empty store per test)."""
    yield from _run_in(tmp_path, "memory")


@pytest.fixture
def grpc_embedded_server_fresh(tmp_path: Path) -> Iterator[GrpcServerProcess]:
    """An embedded-default ``castore serve`` of the test's own (an empty store per test)."""
    yield from _run_in(tmp_path, "embedded")


@pytest.fixture(params=grpc_backends())
def grpc_server(request: pytest.FixtureRequest) -> GrpcServerProcess:
    """The shared server of each available backend (parametrized)."""
    server: GrpcServerProcess = request.getfixturevalue(f"grpc_{request.param}_server")
    return server


