"""Directories in Google Cloud Bigtable (``type: bigtable``).

URL form: ``bigtable://<instance_name>?project_id=…&table_name=…&family_name=…``
(optional ``app_profile_id``, ``channel_size``, ``timeout``, ``is_read_only``,
``credentials_file``).

The row layout is the reference's, so one table can be shared with it: the row key is the
lowercase hex of the directory digest; one cell in ``family_name`` whose column qualifier
is the same hex string holds the canonical Directory bytes (at most 10 MiB, Bigtable's cell
limit). Single puts are check-and-mutate writes that leave an existing row alone.

``get_recursive`` reads a closure level by level, one batched ReadRows per level (split
into requests of at most ``READ_BATCH`` keys), instead of a round trip per directory.
Closures from ``put_multiple_start`` are written with batched MutateRows after one batched
read has found which rows exist; the root is written last, so a visible root implies a
stored closure. Two writers racing on the same new row may leave two versions of the same
bytes in its cell; reads take the newest version (give the family a max-versions=1 GC rule
to collect the rest).

``google-cloud-bigtable`` (the ``bigtable`` extra) is imported when the service is built;
clients are opened on first use inside the running event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import re
import types
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import attrs

from castore_di.composition.config import DirectoryServiceConfig
from castore_di.composition.fields import (
    config_from_url_fields,
    matches,
    parse_query,
    positive,
    positive_or_none,
    query_fields,
)
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import RootToLeaves
from castore_di.errors import (
    ClosedError,
    ConfigError,
    IntegrityError,
    MissingDependencyError,
    StorageError,
    UnsupportedOperationError,
    ValidationError,
    map_errors,
)
from castore_di.nodes import Directory

__all__ = [
    "BigtableDirectoryService",
    "BigtableDirectoryServiceConfig",
    "CELL_SIZE_LIMIT",
]

CELL_SIZE_LIMIT = 10 * 1024 * 1024
"""Bigtable's limit for one cell's value; larger directories are refused."""

READ_BATCH = 1000
"""Row keys per ReadRows request."""

WRITE_BATCH_ROWS = 2000
"""Rows per MutateRows request (Bigtable allows 100,000 mutations per request)."""

WRITE_BATCH_BYTES = 16 * 1024 * 1024
"""Value bytes per MutateRows request."""

PARALLEL_REQUESTS = 8
"""Batched requests of one operation that run at the same time."""

# gRPC's default receive limit (4 MiB) is below the cell limit; the GAPIC transport lifts it
# for Bigtable itself, the emulator channel needs it lifted here.
_GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

_FAMILY_RE = re.compile(r"[_a-zA-Z0-9][-_.a-zA-Z0-9]*")
_NAME_RE = re.compile(r"[-_.a-zA-Z0-9]+")

T = TypeVar("T")


@functools.cache
def _load_lib() -> types.SimpleNamespace:
    """The parts of google-cloud-bigtable this module uses (imported on first call)."""
    try:
        core_exceptions = importlib.import_module("google.api_core.exceptions")
        auth_exceptions = importlib.import_module("google.auth.exceptions")
        data = importlib.import_module("google.cloud.bigtable.data")
        row_filters = importlib.import_module("google.cloud.bigtable.data.row_filters")
        swappable = importlib.import_module("google.cloud.bigtable.data._async._swappable_channel")
        grpc_aio = importlib.import_module("grpc.aio")
    except ImportError as e:
        raise MissingDependencyError(
            f"the bigtable directory service needs google-cloud-bigtable: pip install 'castore_di[bigtable]' ({e})"
        ) from e

    class _Client(data.BigtableDataClientAsync):  # type: ignore[misc, name-defined]
        """The async data client, with gRPC message limits lifted on the emulator channel too."""

        def _build_grpc_channel(self, *args: Any, **kwargs: Any) -> Any:
            if self._emulator_host is None:
                return super()._build_grpc_channel(*args, **kwargs)
            host = self._emulator_host
            channel = swappable.AsyncSwappableChannel(
                lambda: grpc_aio.insecure_channel(host, options=_GRPC_OPTIONS)
            )
            channel._unary_unary_interceptors.append(self._metrics_interceptor)
            channel._unary_stream_interceptors.append(self._metrics_interceptor)
            return channel

    return types.SimpleNamespace(
        Client=_Client,
        ReadRowsQuery=data.ReadRowsQuery,
        RowMutationEntry=data.RowMutationEntry,
        SetCell=data.SetCell,
        filters=row_filters,
        errors=(
            core_exceptions.GoogleAPIError,
            auth_exceptions.GoogleAuthError,
            data.MutationsExceptionGroup,
            data.RetryExceptionGroup,
            data.ShardedReadRowsExceptionGroup,
        ),
    )


def _regex_literal(text: str) -> bytes:
    """``text`` as an RE2 pattern that matches exactly it (names here hold only ``[-_.a-zA-Z0-9]``)."""
    return text.replace(".", "\\.").encode()


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class BigtableDirectoryService(DirectoryService):
    """Directories as cells of a Bigtable table (see the module docstring for the layout).

    ``read_requests`` and ``write_requests`` count the RPCs issued (ReadRows, and
    MutateRows / CheckAndMutateRow), which shows the batching at work.
    """

    def __init__(
        self,
        *,
        project_id: str,
        instance_name: str,
        table_name: str,
        family_name: str,
        app_profile_id: str = "default",
        channel_size: int = 4,
        timeout: float | None = 4.0,
        is_read_only: bool = False,
        credentials_file: str | None = None,
    ) -> None:
        self._lib = _load_lib()
        self.project_id = project_id
        self.instance_name = instance_name
        self.table_name = table_name
        self.family_name = family_name
        self.app_profile_id = app_profile_id
        self.channel_size = channel_size
        self.timeout = timeout
        self.is_read_only = is_read_only
        self.credentials_file = credentials_file
        self.read_requests = 0
        self.write_requests = 0
        self._clients: list[Any] = []
        self._tables: list[Any] = []
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._family_pattern = _regex_literal(family_name)

    # -- connection ------------------------------------------------------------------

    def _table(self) -> Any:
        """A table handle, round-robin over ``channel_size`` clients opened on first use."""
        if self._closed:
            raise ClosedError("bigtable directory service is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # gRPC aio channels belong to the loop that made them; a service used from a new
            # loop (asyncio.run per CLI command) opens new clients there.
            self._clients, self._tables = [], []
            self._loop = loop
        if not self._tables:
            self._open()
        table = self._tables[self._next % len(self._tables)]
        self._next += 1
        return table

    def _open(self) -> None:
        credentials = None
        if self.credentials_file is not None:
            with map_errors(
                {(OSError, ValueError): StorageError}, f"bigtable: cannot load credentials_file {self.credentials_file!r}"
            ):
                service_account = importlib.import_module("google.oauth2.service_account")
                credentials = service_account.Credentials.from_service_account_file(
                    self.credentials_file,
                    scopes=["https://www.googleapis.com/auth/bigtable.data"],
                )
        timeouts: dict[str, float | None] = {}
        if self.timeout is not None:
            timeouts = {
                "default_read_rows_attempt_timeout": self.timeout,
                "default_mutate_rows_attempt_timeout": self.timeout,
                "default_attempt_timeout": self.timeout,
                "default_operation_timeout": max(self.timeout, 60.0),
            }
        with self._translate("open a client"):
            for _ in range(self.channel_size):
                with warnings.catch_warnings():
                    # The library warns on every client made for the emulator; that is the intent here.
                    warnings.filterwarnings("ignore", "Connecting to Bigtable emulator", RuntimeWarning)
                    client = self._lib.Client(project=self.project_id, credentials=credentials)
                self._clients.append(client)
                self._tables.append(
                    client.get_table(
                        self.instance_name, self.table_name, app_profile_id=self.app_profile_id, **timeouts
                    )
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        clients, self._clients, self._tables = self._clients, [], []
        for client in clients:
            with contextlib.suppress(Exception):  # closing is best effort, never an error
                await client.close()

    async def check_connectivity(self) -> str:
        """One ReadRows of an absent row, not retried: the emulator or service and the table answer."""
        table = self._table()
        query = self._lib.ReadRowsQuery(row_keys=[b"castore-connectivity-check"])
        timeout = self.timeout or 10.0
        with self._translate("read the table"):
            await table.read_rows(query, operation_timeout=timeout, attempt_timeout=timeout, retryable_errors=())
        return f"bigtable {self.project_id}/{self.instance_name}/{self.table_name}: table readable"

    def _translate(self, action: str) -> Any:
        """``map_errors`` for one request: the library's errors become :class:`StorageError`."""
        return map_errors({self._lib.errors: StorageError}, f"bigtable: unable to {action}")

    async def _bounded(self, jobs: list[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run ``jobs`` with at most ``PARALLEL_REQUESTS`` in flight."""
        if len(jobs) == 1:
            return [await jobs[0]()]
        gate = asyncio.Semaphore(PARALLEL_REQUESTS)

        async def run(job: Callable[[], Awaitable[T]]) -> T:
            async with gate:
                return await job()

        return list(await asyncio.gather(*(run(j) for j in jobs)))

    # -- reads -----------------------------------------------------------------------

    def _row_filter(self, *, strip_values: bool = False) -> Any:
        f = self._lib.filters
        parts = [f.FamilyNameRegexFilter(self._family_pattern), f.CellsColumnLimitFilter(1)]
        if strip_values:
            parts.append(f.StripValueTransformerFilter(True))
        return f.RowFilterChain(parts)

    async def _read_batch(self, keys: Sequence[bytes], *, strip_values: bool) -> dict[bytes, bytes]:
        query = self._lib.ReadRowsQuery(row_keys=list(keys), row_filter=self._row_filter(strip_values=strip_values))
        table = self._table()
        self.read_requests += 1
        with self._translate("read rows"):
            rows = await table.read_rows(query)
        wanted = set(keys)
        out: dict[bytes, bytes] = {}
        for row in rows:
            key = bytes(row.row_key)
            if key not in wanted:
                raise StorageError(f"bigtable: got unrequested row {key!r}")
            cells = [c for c in row.cells if c.family == self.family_name]
            if not cells:
                raise StorageError(f"bigtable: row {key.decode()} has no cells in family {self.family_name!r}")
            if len(cells) > 1:
                raise StorageError(f"bigtable: row {key.decode()} has more than one cell")
            if bytes(cells[0].qualifier) != key:
                raise StorageError(f"bigtable: row {key.decode()} has unexpected cell qualifier {cells[0].qualifier!r}")
            out[key] = bytes(cells[0].value)
        return out

    async def _read(self, keys: Sequence[bytes], *, strip_values: bool = False) -> dict[bytes, bytes]:
        """``{row key: cell value}`` for the keys that exist, in batched, parallel requests."""
        batches = await self._bounded(
            [
                functools.partial(self._read_batch, chunk, strip_values=strip_values)
                for chunk in _chunks(keys, READ_BATCH)
            ]
        )
        merged: dict[bytes, bytes] = {}
        for b in batches:
            merged.update(b)
        return merged

    @staticmethod
    def _decode(digest: B3Digest, raw: bytes) -> Directory:
        got = blake3_digest(raw)
        if got != digest:
            raise IntegrityError(f"directory {digest}: stored bytes hash to {got}")
        try:
            return Directory.decode(raw)
        except ValidationError as e:
            raise IntegrityError(f"directory {digest}: stored bytes are not a valid Directory: {e}") from e

    async def get(self, digest: B3Digest) -> Directory | None:
        key = digest.hex().encode()
        raw = (await self._read([key])).get(key)
        return None if raw is None else self._decode(digest, raw)

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self._walk(root)

    async def _walk(self, root: B3Digest) -> AsyncIterator[Directory]:
        validator = RootToLeaves(root)
        queued = {root}
        level = [root]
        while level:
            found = await self._read([d.hex().encode() for d in level])
            following: list[B3Digest] = []
            for digest in level:
                raw = found.get(digest.hex().encode())
                if raw is None:
                    if digest == root:
                        return
                    raise StorageError(f"directory {digest} is referenced in the closure of {root} but does not exist")
                directory = self._decode(digest, raw)
                validator.add(directory, digest)
                for _name, node in directory.directories():
                    if node.digest not in queued:
                        queued.add(node.digest)
                        following.append(node.digest)
                yield directory
            level = following

    # -- writes ----------------------------------------------------------------------

    def _writable(self, directory: Directory) -> bytes:
        if self.is_read_only:
            raise UnsupportedOperationError("bigtable directory service is read-only (is_read_only: true)")
        raw = directory.encode()
        if len(raw) > CELL_SIZE_LIMIT:
            raise ValidationError(
                f"directory {directory.digest} is {len(raw)} bytes, over Bigtable's cell limit of {CELL_SIZE_LIMIT}"
            )
        return raw

    async def put(self, directory: Directory) -> B3Digest:
        raw = self._writable(directory)
        key = directory.digest.hex().encode()
        f = self._lib.filters
        table = self._table()
        self.write_requests += 1
        with self._translate("mutate rows"):
            # An existing row is left alone; -1 asks for the server's timestamp, as the reference.
            await table.check_and_mutate_row(
                key,
                f.ColumnQualifierRegexFilter(key),
                false_case_mutations=[self._lib.SetCell(self.family_name, key, raw, timestamp_micros=-1)],
            )
        return directory.digest

    async def _mutate_batch(self, entries: list[Any]) -> None:
        table = self._table()
        self.write_requests += 1
        with self._translate("mutate rows"):
            await table.bulk_mutate_rows(entries)

    def _entries(self, items: list[tuple[bytes, bytes]]) -> list[list[Any]]:
        """Mutation entries (client timestamps: retries are idempotent) in size-bounded batches."""
        batches: list[list[Any]] = []
        batch: list[Any] = []
        size = 0
        for key, raw in items:
            if batch and (len(batch) >= WRITE_BATCH_ROWS or size + len(raw) > WRITE_BATCH_BYTES):
                batches.append(batch)
                batch, size = [], 0
            batch.append(self._lib.RowMutationEntry(key, [self._lib.SetCell(self.family_name, key, raw)]))
            size += len(raw)
        if batch:
            batches.append(batch)
        return batches

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        items = [(d.digest.hex().encode(), self._writable(d)) for d in directories]
        existing = await self._read([k for k, _ in items], strip_values=True)
        missing = [(k, raw) for k, raw in items if k not in existing]
        root_key = root.hex().encode()
        inner = [(k, raw) for k, raw in missing if k != root_key]
        last = [(k, raw) for k, raw in missing if k == root_key]
        await self._bounded([functools.partial(self._mutate_batch, b) for b in self._entries(inner)])
        for b in self._entries(last):
            await self._mutate_batch(b)


_name = matches(_NAME_RE.pattern, "a non-empty name of letters, digits, '-', '_' or '.'")
_family = matches(_FAMILY_RE.pattern, "a valid column family name ([_a-zA-Z0-9][-_.a-zA-Z0-9]*)")
_str = attrs.validators.instance_of(str)


@attrs.frozen(kw_only=True)
class BigtableDirectoryServiceConfig(DirectoryServiceConfig):
    """A table in Google Cloud Bigtable (or its emulator, via ``BIGTABLE_EMULATOR_HOST``).

    Attributes:
        project_id: the Google Cloud project.
        instance_name: the Bigtable instance.
        table_name: the table; it must exist and hold ``family_name``.
        family_name: the column family holding the directories.
        app_profile_id: the app profile requests are sent with.
        channel_size: gRPC channels (one client each) requests are spread over.
        timeout: seconds one request attempt may take; ``None`` keeps the client
            library's defaults.
        is_read_only: refuse writes.
        credentials_file: a service-account JSON key; by default application default
            credentials (the emulator needs none).
    """

    type_tag: ClassVar[str] = "bigtable"
    project_id: str = attrs.field(validator=[_str, _name])
    instance_name: str = attrs.field(validator=[_str, _name])
    table_name: str = attrs.field(validator=[_str, _name])
    family_name: str = attrs.field(validator=[_str, _family])
    app_profile_id: str = attrs.field(default="default", validator=[_str, _name])
    channel_size: int = attrs.field(default=4, validator=[attrs.validators.instance_of(int), positive])
    timeout: float | None = attrs.field(default=4.0, validator=positive_or_none)
    is_read_only: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    credentials_file: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )

    def build(self) -> BigtableDirectoryService:
        return BigtableDirectoryService(**attrs.asdict(self))

    @classmethod
    def from_url(cls, url: str) -> "BigtableDirectoryServiceConfig":
        """``bigtable://<instance_name>?project_id=…&table_name=…&family_name=…[&…]``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "bigtable":
            raise ConfigError(f"invalid url {url!r}: expected the scheme bigtable://")
        if not parts.netloc:
            raise ConfigError(f"invalid url {url!r}: instance name missing (bigtable://<instance_name>?…)")
        if parts.path or parts.fragment:
            raise ConfigError(f"invalid url {url!r}: bigtable:// takes no path or fragment")
        known = [f.name for f in attrs.fields(cls) if f.name != "instance_name"]
        fields = query_fields(cls, url, parse_query(url, parts.query), known)
        return config_from_url_fields(cls, url, {"instance_name": parts.netloc, **fields})
