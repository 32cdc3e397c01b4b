"""The bigtable directory service: config and URL handling, and behaviour on the emulator."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from castore_di import load_container
from castore_di.composition import directory_service_from_addr
from castore_di.directoryservice import bigtable as bt
from castore_di.directoryservice.bigtable import (
    CELL_SIZE_LIMIT,
    BigtableDirectoryService,
    BigtableDirectoryServiceConfig,
)
from castore_di.errors import (
    ClosedError,
    ConfigError,
    IntegrityError,
    MissingDependencyError,
    StorageError,
    UnknownFieldError,
    UnsupportedOperationError,
    ValidationError,
)
from castore_di.nodes import Directory, SymlinkNode
from castore_di.testing.directory_conformance import check_closure_order
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_A, DIRECTORY_D, chain
from tests.servers_bigtable import BigtableEmulator

# --- URL form (reference table §4.5 plus our stricter rules) --------------------------

REF_URL = "bigtable://instance-1?project_id=project-1&table_name=table-1&family_name=cf1"


def test_reference_url() -> None:
    cfg = BigtableDirectoryServiceConfig.from_url(REF_URL)
    assert cfg == BigtableDirectoryServiceConfig(
        project_id="project-1", instance_name="instance-1", table_name="table-1", family_name="cf1"
    )
    assert (cfg.app_profile_id, cfg.channel_size, cfg.timeout, cfg.is_read_only) == ("default", 4, 4.0, False)


def test_reference_url_with_channel_size_and_timeout() -> None:
    cfg = BigtableDirectoryServiceConfig.from_url(REF_URL + "&channel_size=10&timeout=10")
    assert cfg.channel_size == 10 and type(cfg.channel_size) is int
    assert cfg.timeout == 10.0 and type(cfg.timeout) is float


def test_url_optional_parameters() -> None:
    cfg = BigtableDirectoryServiceConfig.from_url(
        REF_URL + "&app_profile_id=p&is_read_only=true&timeout=none&credentials_file=/k.json"
    )
    assert (cfg.app_profile_id, cfg.is_read_only, cfg.timeout, cfg.credentials_file) == ("p", True, None, "/k.json")


@pytest.mark.parametrize(
    "url",
    [
        "bigtable://instance-1",  # reference: false (parameters missing)
        "bigtable://?project_id=p&table_name=t&family_name=cf1",  # no instance
        REF_URL + "&bogus=1",
        REF_URL + "&channel_size=four",
        REF_URL + "&channel_size=0",
        REF_URL + "&timeout=-1",
        REF_URL + "&is_read_only=yes",
        REF_URL + "&table_name=again",
        "bigtable://instance-1/path?project_id=p&table_name=t&family_name=cf1",
        "bigtable://instance-1?project_id=p&table_name=t&family_name=bad%20family",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        BigtableDirectoryServiceConfig.from_url(url)


def test_from_addr_builds_without_io(monkeypatch: pytest.MonkeyPatch) -> None:
    # No emulator and no credentials: building must still succeed, since it does no I/O.
    monkeypatch.delenv("BIGTABLE_EMULATOR_HOST", raising=False)
    service = directory_service_from_addr(REF_URL)
    assert isinstance(service, BigtableDirectoryService)
    assert service.table_name == "table-1" and service._clients == []


# --- config (strict, through the composition) ----------------------------------------

FIELDS: dict[str, Any] = {"project_id": "p", "instance_name": "i", "table_name": "t", "family_name": "cf1"}


def _config(**extra: Any) -> dict[str, Any]:
    return {"directoryservices": {"default": {"type": "bigtable", **FIELDS, **extra}}}


def test_config_defaults_and_int_timeout() -> None:
    container = load_container(_config(timeout=2))
    service = container.directory_service()
    assert isinstance(service, BigtableDirectoryService)
    assert service.timeout == 2.0 and service.channel_size == 4 and service.app_profile_id == "default"
    assert isinstance(load_container(_config(timeout=None)).directory_service(), BigtableDirectoryService)


@pytest.mark.parametrize(
    "extra",
    [
        {"channel_size": "4"},
        {"channel_size": 2.5},
        {"channel_size": 0},
        {"timeout": "4"},
        {"timeout": 0},
        {"is_read_only": "false"},
        {"family_name": "has space"},
        {"family_name": ""},
        {"credentials_file": 3},
    ],
)
def test_config_rejects_bad_values(extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="directoryservices.default"):
        load_container(_config(**extra))


def test_config_rejects_unknown_and_missing_fields() -> None:
    with pytest.raises(UnknownFieldError, match="family"):
        load_container(_config(familyname="x"))
    cfg = dict(FIELDS)
    del cfg["table_name"]
    with pytest.raises(ConfigError, match="table_name"):
        load_container({"directoryservices": {"default": {"type": "bigtable", **cfg}}})


def test_config_module_does_not_import_the_library() -> None:
    code = (
        "import sys, castore_di.directoryservice.bigtable as b; "
        "b.BigtableDirectoryServiceConfig.from_url(" + repr(REF_URL) + "); "
        "assert 'google.cloud.bigtable' not in sys.modules, 'imported early'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    bt._load_lib.cache_clear()
    monkeypatch.setitem(sys.modules, "google.cloud.bigtable.data", None)
    try:
        with pytest.raises(MissingDependencyError, match=r"castore_di\[bigtable\]"):
            BigtableDirectoryServiceConfig(**FIELDS).build()
    finally:
        bt._load_lib.cache_clear()


# --- behaviour on the emulator ---------------------------------------------------------


@pytest.fixture
async def service(bigtable_table: dict[str, Any]) -> AsyncIterator[BigtableDirectoryService]:
    s = BigtableDirectoryServiceConfig(**bigtable_table).build()
    yield s
    await s.close()


def _tree(width: int, fanout: int) -> list[Directory]:
    """root -> ``width`` middle directories -> ``fanout`` distinct leaves each; leaves first."""
    leaves = [Directory({f"leaf{i}".encode(): SymlinkNode(b"t")}) for i in range(width * fanout)]
    middles = [
        Directory({f"l{j}".encode(): leaves[i * fanout + j].as_node() for j in range(fanout)}) for i in range(width)
    ]
    root = Directory({f"m{i:04d}".encode(): m.as_node() for i, m in enumerate(middles)})
    return [*leaves, *middles, root]


async def test_get_recursive_reads_level_by_level(service: BigtableDirectoryService) -> None:
    closure = _tree(width=40, fanout=5)  # 3 levels, 241 directories
    root = await service.put_closure(closure)
    before = service.read_requests
    received = [d async for d in service.get_recursive(root)]
    check_closure_order(root, received)
    assert len(received) == len(closure)
    assert service.read_requests - before == 3  # one ReadRows per level, not per directory


async def test_wide_level_is_split_into_bounded_requests(service: BigtableDirectoryService) -> None:
    closure = _tree(width=1, fanout=bt.READ_BATCH + 200)  # level 3 holds READ_BATCH + 200 leaves
    root = await service.put_closure(closure)
    before = service.read_requests
    received = [d async for d in service.get_recursive(root)]
    assert len(received) == len(closure)
    assert service.read_requests - before == 1 + 1 + 2


async def test_put_closure_writes_in_batches_and_root_last(service: BigtableDirectoryService) -> None:
    closure = _tree(width=10, fanout=bt.WRITE_BATCH_ROWS // 10)  # 2011 directories
    writes, reads = service.write_requests, service.read_requests
    root = await service.put_closure(closure)
    # the existence check: ceil(2011 / READ_BATCH) reads; writes: 2 batches + the root alone
    assert service.read_requests - reads == 3
    assert service.write_requests - writes == 3
    # everything present now: a second put only checks, writes nothing
    writes = service.write_requests
    assert await service.put_closure(closure) == root
    assert service.write_requests == writes


async def test_existing_rows_are_left_alone(service: BigtableDirectoryService, bigtable_emulator: BigtableEmulator) -> None:
    table = bigtable_emulator.data_table(service.table_name)
    key = DIRECTORY_A.digest.hex().encode()
    await service.put(DIRECTORY_A)
    first = table.read_row(key).cells
    await service.put(DIRECTORY_A)
    await service.put_closure([DIRECTORY_A])
    again = table.read_row(key).cells
    assert len(again) == 1 and again[0].timestamp_micros == first[0].timestamp_micros
    assert again[0].qualifier == key and again[0].family == service.family_name


async def test_large_directory_round_trips(service: BigtableDirectoryService) -> None:
    # ~6 MiB: over gRPC's default 4 MiB message limit, under Bigtable's cell limit.
    big = Directory({f"s{i:05d}".encode(): SymlinkNode(b"x" * 4000) for i in range(1500)})
    assert 4 * 2**20 < len(big.encode()) < CELL_SIZE_LIMIT
    parent = Directory({b"big": big.as_node()})
    root = await service.put_closure([big, parent])
    assert await service.get(big.digest) == big
    assert [d async for d in service.get_recursive(root)] == [parent, big]


async def test_directory_over_cell_limit_is_refused(service: BigtableDirectoryService) -> None:
    huge = Directory({f"s{i:05d}".encode(): SymlinkNode(b"x" * 4000) for i in range(2700)})
    assert len(huge.encode()) > CELL_SIZE_LIMIT
    with pytest.raises(ValidationError, match="cell limit"):
        await service.put(huge)
    parent = Directory({b"a": DIRECTORY_A.as_node(), b"huge": huge.as_node()})
    with pytest.raises(ValidationError, match="cell limit"):
        await service.put_closure([DIRECTORY_A, huge, parent])
    assert await service.get(DIRECTORY_A.digest) is None  # nothing of the closure was written


async def test_read_only_refuses_writes(bigtable_table: dict[str, Any]) -> None:
    writer = BigtableDirectoryServiceConfig(**bigtable_table).build()
    reader = BigtableDirectoryServiceConfig(**bigtable_table, is_read_only=True).build()
    try:
        root = await writer.put_closure(CLOSURE_D)
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            await reader.put(DIRECTORY_A)
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            await reader.put_closure(chain(3))
        assert await reader.get(root) == DIRECTORY_D
        assert len([d async for d in reader.get_recursive(root)]) == len(CLOSURE_D)
    finally:
        await writer.close()
        await reader.close()


async def test_missing_inner_directory_is_a_storage_error(
    service: BigtableDirectoryService, bigtable_emulator: BigtableEmulator
) -> None:
    from google.cloud.bigtable.data import DeleteAllFromRow

    dirs = chain(4)
    root = await service.put_closure(dirs)
    bigtable_emulator.data_table(service.table_name).mutate_row(dirs[1].digest.hex().encode(), [DeleteAllFromRow()])
    with pytest.raises(StorageError, match="does not exist"):
        _ = [d async for d in service.get_recursive(root)]


async def test_corrupt_inner_directory_detected_by_get_recursive(
    service: BigtableDirectoryService, bigtable_emulator: BigtableEmulator
) -> None:
    from tests.cases_bigtable import BigtableDirectoryBackdoor

    dirs = chain(4)
    root = await service.put_closure(dirs)

    class _Req:
        def getfixturevalue(self, name: str) -> Any:
            return bigtable_emulator

    await BigtableDirectoryBackdoor(service, _Req()).corrupt(dirs[0].digest)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        _ = [d async for d in service.get_recursive(root)]


async def test_missing_table_is_a_storage_error(bigtable_table: dict[str, Any]) -> None:
    service = BigtableDirectoryServiceConfig(**{**bigtable_table, "table_name": "no-such-table"}).build()
    try:
        with pytest.raises(StorageError, match="bigtable"):
            await service.get(DIRECTORY_A.digest)
        with pytest.raises(StorageError, match="bigtable"):
            await service.put(DIRECTORY_A)
    finally:
        await service.close()


async def test_credential_problems_are_storage_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # Without the emulator the client needs credentials; none of these reach the network.
    monkeypatch.delenv("BIGTABLE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{not json")
    extras: list[dict[str, Any]] = [
        {},
        {"credentials_file": str(tmp_path / "absent.json")},
        {"credentials_file": str(tmp_path / "bad.json")},
    ]
    for extra in extras:
        service = BigtableDirectoryServiceConfig(**FIELDS, **extra).build()
        with pytest.raises(StorageError, match="bigtable"):
            await service.get(DIRECTORY_A.digest)
        await service.close()


async def test_channel_size_and_close(bigtable_table: dict[str, Any]) -> None:
    service = BigtableDirectoryServiceConfig(**bigtable_table, channel_size=3).build()
    await service.put_closure(CLOSURE_D)
    for _ in range(4):
        assert await service.get(DIRECTORY_D.digest) == DIRECTORY_D
    assert len(service._clients) == 3
    await service.close()
    await service.close()  # idempotent
    with pytest.raises(ClosedError):
        await service.get(DIRECTORY_D.digest)


def test_usable_from_successive_event_loops(bigtable_table: dict[str, Any]) -> None:
    import asyncio

    service = BigtableDirectoryServiceConfig(**bigtable_table).build()
    root = asyncio.run(service.put_closure(CLOSURE_D))
    assert asyncio.run(service.get(root)) == DIRECTORY_D
    asyncio.run(service.close())


async def test_cache_in_front_of_bigtable_fills_near_on_a_miss(bigtable_table: dict[str, Any]) -> None:
    container = load_container(
        {
            "directoryservices": {
                "near": {"type": "memory"},
                "far": {"type": "bigtable", **bigtable_table},
                "default": {"type": "cache", "near": "near", "far": "far"},
            }
        }
    )
    try:
        far = container.directory_service("far")
        near = container.directory_service("near")
        cache = container.directory_service("default")
        assert isinstance(far, BigtableDirectoryService)
        root = await far.put_closure(CLOSURE_D)
        assert await near.get(root) is None
        assert await cache.get(root) == DIRECTORY_D
        for d in CLOSURE_D:  # the whole closure was copied into near
            assert await near.get(d.digest) == d
        reads = far.read_requests
        received = [d async for d in cache.get_recursive(root)]
        check_closure_order(root, received)
        assert far.read_requests == reads  # served by near
    finally:
        await container.aclose()
