"""What every command shares: the selected services, built once and closed at the end."""

from __future__ import annotations

import gc
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from castore_di.errors import ConfigError, CycleError, UnknownTypeError

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.composition import CastoreContainer, CompositionGraph
    from castore_di.composition.direct import DirectInstances
    from castore_di.directoryservice.base import DirectoryService

__all__ = ["CliContext", "default_config", "pause_gc", "resume_gc", "console_startup", "import_dependency_injector"]

_gc_paused = False
_console = False  # in the console script's own process (see console_startup)


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


def console_startup() -> None:
    """Called once by the console script (not when a program calls ``main(argv)``): pauses
    the collector (:func:`pause_gc`) and makes :func:`import_dependency_injector` lean."""
    global _console
    _console = True
    pause_gc()


# Optional integrations dependency-injector imports when they are installed (FastAPI,
# Flask/werkzeug, pydantic settings: ~0.4 s together). The CLI uses none of them.
_DI_OPTIONAL = frozenset({"fastapi", "fast_depends", "starlette", "werkzeug", "flask", "pydantic", "pydantic_settings"})


class _SkipOptional:
    # A meta path finder (structurally: importlib.abc would cost its own import).
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.partition(".")[0] in _DI_OPTIONAL:
            raise ModuleNotFoundError(f"{name} is not loaded by the castore command", name=name)
        return None


def import_dependency_injector() -> None:
    """Import dependency-injector; in the console script's process, without its optional
    web-framework integrations.

    A program that imports castore_di as a library keeps dependency-injector's
    integrations. Commands call this before building a container (most commands build
    their services without one: :mod:`castore_di.composition.direct`).
    ``benches/container_bench.py`` measures the start-up this saves.
    """
    if not _console or "dependency_injector" in sys.modules or any(m in sys.modules for m in _DI_OPTIONAL):
        return
    finder = _SkipOptional()
    sys.meta_path.insert(0, finder)
    try:
        import dependency_injector.containers  # noqa: F401
        import dependency_injector.providers  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


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


def _instances(graph: CompositionGraph, metrics: Any) -> CastoreContainer | DirectInstances:
    from castore_di.composition.direct import direct_instances

    direct = direct_instances(graph, metrics)
    if direct is not None:
        return direct
    import_dependency_injector()
    from castore_di.composition.container import build_container

    return build_container(graph, metrics)


class CliContext:
    """The options that select the services, and the services once built.

    ``config`` is a config given as a mapping (used when ``config_path`` is not set);
    ``metrics`` a :class:`castore_di.metrics.Metrics` to record into (set before the
    services are built). A plain class: every command creates one at start-up.
    """

    def __init__(self, config_path: str | None = None, blob_name: str = "default", directory_name: str = "default",
                 blob_addr: str | None = None, directory_addr: str | None = None, verbose: bool = False,
                 config: Mapping[str, Any] | None = None, metrics: Any = None) -> None:
        self.config_path = config_path
        self.blob_name = blob_name
        self.directory_name = directory_name
        self.blob_addr = blob_addr
        self.directory_addr = directory_addr
        self.verbose = verbose
        self.config = config
        self.metrics = metrics
        self._services: CastoreContainer | DirectInstances | None = None
        self._addr_services: CastoreContainer | DirectInstances | None = None

    def _config_services(self) -> CastoreContainer | DirectInstances:
        """The services of ``--config``/``CASTORE_CONFIG`` (or ``config``), else of the default config.

        Built without dependency-injector (:mod:`castore_di.composition.direct`) unless a
        build is async; the whole config is validated either way.
        """
        if self._services is None:
            from castore_di.composition.graph import build_graph
            from castore_di.composition.loader import read_config

            source = self.config_path or self.config or default_config()
            self._services = _instances(build_graph(read_config(source, cache=True)), self.metrics)
        return self._services

    def _addrs(self) -> CastoreContainer | DirectInstances:
        if self._addr_services is None:
            from castore_di.composition import addr_config, build_graph

            try:
                graph = build_graph(addr_config(blob=self.blob_addr, directory=self.directory_addr))
            except ConfigError as e:
                raise _addr_error(e, self.blob_addr, self.directory_addr) from None
            self._addr_services = _instances(graph, self.metrics)
        return self._addr_services

    def blob_service(self) -> BlobService:
        if self.blob_addr:
            service = self._addrs().blob_service()
        else:
            service = self._config_services().blob_service(self.blob_name)
        resume_gc()
        return service

    def directory_service(self) -> DirectoryService:
        if self.directory_addr:
            service = self._addrs().directory_service()
        else:
            service = self._config_services().directory_service(self.directory_name)
        resume_gc()
        return service

    def loopless(self) -> bool:
        """Whether the selected blob and directory services can run without an event loop
        (:mod:`castore_di._loopless`), as read commands on the embedded store do.

        Builds both (building does no I/O). One that cannot be built answers no: the
        command, run on an event loop, then meets the error where it asks for that service.
        """
        from castore_di.composition.direct import DirectInstances

        try:
            services = (self.blob_service(), self.directory_service())
        except Exception:
            return False
        built = [c for c in (self._services, self._addr_services) if c is not None]
        return all(isinstance(c, DirectInstances) for c in built) and all(type(s).loopless for s in services)

    async def aclose(self) -> None:
        for c in (self._addr_services, self._services):
            if c is not None:
                await c.aclose()
        self._services = self._addr_services = None
