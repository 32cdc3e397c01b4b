"""What every command shares: the selected services, built once and closed at the end."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import attrs

from castore_di.errors import ConfigError, CycleError, UnknownTypeError

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.composition import CastoreContainer
    from castore_di.directoryservice.base import DirectoryService

__all__ = ["CliContext", "default_config", "pause_gc", "resume_gc"]

_gc_paused = False


def pause_gc() -> None:
    """Start-up: no garbage collection while modules load and the services are built.

    Start-up allocates mostly objects that live as long as the process (modules, classes,
    functions); collecting among them costs about a tenth of a short command's time and
    frees next to nothing. :func:`resume_gc` ends the pause.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """End of start-up: what exists now is frozen (never scanned again), collections resume."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def default_config() -> dict[str, Any]:
    """The config used when none is given: the embedded on-disk store (memory if unavailable)."""
    from castore_di.composition import default_registry

    registry = default_registry()
    if "embedded" in registry.tags("blobservices") and "embedded" in registry.tags("directoryservices"):
        return {
            "blobservices": {"default": {"type": "embedded"}},
            "directoryservices": {"default": {"type": "embedded"}},
        }
    return {"blobservices": {"default": {"type": "memory"}}, "directoryservices": {"default": {"type": "memory"}}}


_OPTIONS = {"blobservices": "--blob-service-addr", "directoryservices": "--directory-service-addr"}


def url_schemes(kind: str) -> list[str]:
    """The type tags of ``kind`` that have a URL form (``memory``, ``grpc`` …)."""
    from castore_di.composition import default_registry
    from castore_di.composition.config import ServiceConfig

    registry = default_registry()
    schemes = []
    for tag in registry.tags(kind):
        try:
            cls = registry.resolve(kind, tag)
        except ConfigError:
            continue
        if cls.from_url.__func__ is not ServiceConfig.from_url.__func__:  # type: ignore[attr-defined]
            schemes.append(tag)
    return schemes


def _addr_error(e: ConfigError, blob_addr: str | None, directory_addr: str | None) -> ConfigError:
    """A config error about an ``--…-addr`` URL, named after the option rather than a config path."""
    kind, _, rest = (e.path or "").partition(".")
    option = _OPTIONS.get(kind)
    if option is None:
        return e
    where = option + rest.removeprefix("default")
    url = blob_addr if kind == "blobservices" else directory_addr
    if isinstance(e, UnknownTypeError):
        return UnknownTypeError(
            f"unknown URL scheme in {url!r} (known schemes: {', '.join(url_schemes(kind))}; "
            "e.g. memory://, grpc+http://HOST:PORT, embedded:///PATH, objectstore+s3://BUCKET/PREFIX)", path=where)
    return type(e)(e.detail, path=where) if type(e) is not CycleError else e


@attrs.define
class CliContext:
    config_path: str | None = None
    blob_name: str = "default"
    directory_name: str = "default"
    blob_addr: str | None = None
    directory_addr: str | None = None
    verbose: bool = False
    _container: CastoreContainer | None = None
    _addr_container: CastoreContainer | None = None
    metrics: Any = None
    """A :class:`castore_di.metrics.Metrics` to record into (set before the services are built)."""

    def container(self) -> CastoreContainer:
        """The container from ``--config``/``CASTORE_CONFIG``, else the default config."""
        if self._container is None:
            from castore_di.composition import load_container

            self._container = load_container(
                self.config_path if self.config_path else default_config(), metrics=self.metrics
            )
        return self._container

    def _addrs(self) -> CastoreContainer:
        if self._addr_container is None:
            from castore_di.composition import container_from_addrs

            try:
                self._addr_container = container_from_addrs(
                    blob=self.blob_addr, directory=self.directory_addr, metrics=self.metrics
                )
            except ConfigError as e:
                raise _addr_error(e, self.blob_addr, self.directory_addr) from None
        return self._addr_container

    def blob_service(self) -> BlobService:
        if self.blob_addr:
            service = self._addrs().blob_service()
        else:
            service = self.container().blob_service(self.blob_name)
        resume_gc()
        return service

    def directory_service(self) -> DirectoryService:
        if self.directory_addr:
            service = self._addrs().directory_service()
        else:
            service = self.container().directory_service(self.directory_name)
        resume_gc()
        return service

    async def aclose(self) -> None:
        for c in (self._addr_container, self._container):
            if c is not None:
                await c.aclose()
        self._container = self._addr_container = None
