"""mirrored, sharded, readonly, combined write_to and bounded memory stores beyond the conformance suites.

Real faults: members and shards that are ``grpc`` instances pointing at a ``castore serve``
that was stopped (connections refused); read repair into a live ``castore serve``; sharding
stability over on-disk (embedded) shards reopened with a shard removed or added.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castore_di import ConfigError, CycleError, container_from_addrs, load_container, load_graph
from castore_di.blobservice.sharded import Rendezvous
from castore_di.digests import B3Digest, blake3_digest
from castore_di.errors import StorageError, UnknownInstanceError, UnsupportedOperationError
from castore_di.nodes import Directory, FileNode
from castore_di.testing.fixtures import CLOSURE_D, DIRECTORY_A, DIRECTORY_D
from castore_di.testing.plugin import CastoreServer


@pytest.fixture(scope="module")
def stopped_server() -> Iterator[str]:
    """The URL of a ``castore serve`` that ran on it and was stopped: connections are refused."""
    server = CastoreServer().start()
    url = server.url
    server.stop()
    yield url


@pytest.fixture
def live_server() -> Iterator[str]:
    with CastoreServer() as server:
        yield server.url


def _grpc(url: str) -> dict[str, Any]:
    return {"type": "grpc", "url": url, "retries": 0, "timeout": 5.0, "connect_timeout": 0.5}


def _leaf(i: int) -> Directory:
    return Directory({f"f{i}".encode(): FileNode(blake3_digest(str(i).encode()), i)})


# -- mirrored ----------------------------------------------------------------------------


async def test_mirrored_read_repair_copies_into_earlier_members() -> None:
    config = {
        "blobservices": {"a": "memory://", "b": "memory://", "c": "memory://",
                         "default": {"type": "mirrored", "members": ["a", "b", "c"]}},
        "directoryservices": {"a": "memory://", "b": "memory://",
                              "default": {"type": "mirrored", "members": ["a", "b"]}},
    }
    async with load_container(config) as container:
        a, b, c = (container.blob_service(n) for n in "abc")
        data = os.urandom(100_000)
        digest = await c.put(data)
        await b.put(b"only b")
        assert await container.blob_service().read_bytes(digest) == data
        assert await a.read_bytes(digest) == data and await b.read_bytes(digest) == data  # repaired, verified
        # a member that has it is not written again; an absent blob is absent everywhere
        assert await container.blob_service().read_bytes(blake3_digest(b"only b")) == b"only b"
        assert not await c.has(blake3_digest(b"only b"))  # later members are not repaired
        assert await container.blob_service().open_read(blake3_digest(b"nowhere")) is None

        da, db = container.directory_service("a"), container.directory_service("b")
        await db.put_closure(CLOSURE_D)
        assert await container.directory_service().get(DIRECTORY_D.digest) == DIRECTORY_D
        assert [d.digest async for d in da.get_recursive(DIRECTORY_D.digest)] == \
            [d.digest async for d in db.get_recursive(DIRECTORY_D.digest)]  # the whole closure
        await db.put(_leaf(1))
        assert [d async for d in container.directory_service().get_recursive(_leaf(1).digest)] == [_leaf(1)]
        assert await da.get(_leaf(1).digest) == _leaf(1)


async def test_mirrored_read_repair_into_a_real_server(live_server: str) -> None:
    config = {"blobservices": {"server": _grpc(live_server), "local": "memory://",
                               "default": {"type": "mirrored", "members": ["server", "local"]}},
              "directoryservices": {"server": _grpc(live_server), "local": "memory://",
                                    "default": {"type": "mirrored", "members": ["server", "local"]}}}
    async with load_container(config) as container:
        data = os.urandom(3 * 1024 * 1024 + 1)
        digest = await container.blob_service("local").put(data)
        await container.directory_service("local").put_closure(CLOSURE_D)
        assert await container.blob_service().read_bytes(digest) == data
        assert [d async for d in container.directory_service().get_recursive(DIRECTORY_D.digest)][0] == DIRECTORY_D
        assert await container.blob_service("server").read_bytes(digest) == data
        assert len([d async for d in container.directory_service("server").get_recursive(DIRECTORY_D.digest)]) == 5


async def test_mirrored_with_a_member_down(stopped_server: str) -> None:
    config = {"blobservices": {"up": "memory://", "down": _grpc(stopped_server),
                               "default": {"type": "mirrored", "members": ["up", "down"]},
                               "down_first": {"type": "mirrored", "members": ["down", "up"]}},
              "directoryservices": {"up": "memory://", "down": _grpc(stopped_server),
                                    "default": {"type": "mirrored", "members": ["down", "up"]}}}
    async with load_container(config) as container:
        digest = await container.blob_service("up").put(b"kept")
        for name in ("default", "down_first"):  # reads keep working, whichever member is down
            assert await container.blob_service(name).read_bytes(digest) == b"kept"
            assert await container.blob_service(name).has(digest)
        with pytest.raises(StorageError, match="member 'down': .*unavailable"):
            await container.blob_service().put(b"new")  # writes fail naming the member
        with pytest.raises(StorageError, match="member 'down'"):
            await container.blob_service().has(blake3_digest(b"unknown"))  # absent here, unknown there

        dirs = container.directory_service()
        await container.directory_service("up").put_closure(CLOSURE_D)
        assert await dirs.get(DIRECTORY_D.digest) == DIRECTORY_D
        assert len([d async for d in dirs.get_recursive(DIRECTORY_D.digest)]) == 5
        with pytest.raises(StorageError, match="member 'down'"):
            await dirs.put(DIRECTORY_A)
        with pytest.raises(StorageError, match="member 'down'"):
            await dirs.put_closure(CLOSURE_D)


# -- sharded -----------------------------------------------------------------------------


async def test_sharded_with_a_shard_down(stopped_server: str) -> None:
    config = {"blobservices": {"a": "memory://", "b": "memory://", "gone": _grpc(stopped_server),
                               "default": {"type": "sharded", "shards": ["a", "b", "gone"]}},
              "directoryservices": {"a": "memory://", "gone": _grpc(stopped_server),
                                    "default": {"type": "sharded", "shards": {"one": "a", "two": "gone"}}}}
    async with load_container(config) as container:
        blobs = container.blob_service()
        stored, failed = 0, 0
        for i in range(12):
            data = f"blob {i}".encode()
            if blobs.shard_name(blake3_digest(data)) == "gone":  # type: ignore[attr-defined]
                with pytest.raises(StorageError, match="shard 'gone': .*unavailable"):
                    await blobs.put(data)
                with pytest.raises(StorageError, match="shard 'gone'"):
                    await blobs.read_bytes(blake3_digest(data))
                failed += 1
            else:
                assert await blobs.read_bytes(await blobs.put(data)) == data
                stored += 1
        assert stored and failed

        dirs = container.directory_service()
        ok = 0
        for i in range(8):
            leaf = _leaf(i)
            if dirs.shard_name(leaf.digest) == "two":  # type: ignore[attr-defined]
                with pytest.raises(StorageError, match="shard 'two'"):
                    await dirs.put(leaf)
            else:
                await dirs.put(leaf)
                assert await dirs.get(leaf.digest) == leaf
                ok += 1
        assert 0 < ok < 8


async def test_sharded_directory_closures_span_shards() -> None:
    config = {"directoryservices": {"a": "memory://", "b": "memory://", "c": "memory://",
                                    "default": {"type": "sharded", "shards": ["a", "b", "c"]}}}
    async with load_container(config) as container:
        await container.directory_service().put_closure(CLOSURE_D)
        holders = {n: [d for d in CLOSURE_D if await container.directory_service(n).get(d.digest)] for n in "abc"}
        assert sum(len(v) for v in holders.values()) == len(CLOSURE_D)  # each directory on exactly one shard
        assert len([n for n, v in holders.items() if v]) >= 2
        received = [d async for d in container.directory_service().get_recursive(DIRECTORY_D.digest)]
        assert {d.digest for d in received} == {d.digest for d in CLOSURE_D}


def _shards(tmp_path: Path, names: str) -> dict[str, Any]:
    return {"blobservices": {"default": {"type": "sharded",
                                         "shards": {n: f"embedded://{tmp_path / n}" for n in names}}}}


async def test_sharding_is_stable_when_a_shard_is_removed_or_added(tmp_path: Path) -> None:
    blobs = [f"stable {i}".encode() for i in range(300)]
    placed: dict[B3Digest, str] = {}
    async with load_container(_shards(tmp_path, "abc")) as container:
        sharded = container.blob_service()
        for data in blobs:
            digest = await sharded.put(data)
            placed[digest] = sharded.shard_name(digest)  # type: ignore[attr-defined]
        for name in "abc":
            shard = container.blob_service("default.shards[" + name + "]")
            assert {d for d, n in placed.items() if n == name} == {d for d in placed if await shard.has(d)}
    assert set(placed.values()) == set("abc")
    async with load_container(_shards(tmp_path, "ab")) as container:  # c removed
        sharded = container.blob_service()
        for digest, name in placed.items():
            if name != "c":  # every digest on the other two stays where it was
                assert sharded.shard_name(digest) == name  # type: ignore[attr-defined]
                assert await sharded.has(digest)
            else:
                assert not await sharded.has(digest)
    async with load_container(_shards(tmp_path, "abcd")) as container:  # d added: only d gains
        sharded = container.blob_service()
        moved = [d for d, n in placed.items() if sharded.shard_name(d) != n]  # type: ignore[attr-defined]
        assert moved and all(sharded.shard_name(d) == "d" for d in moved)  # type: ignore[attr-defined]
        assert len(moved) < len(placed) / 2


def test_rendezvous_weights_and_order() -> None:
    keys = [bytes(blake3_digest(str(i).encode())) for i in range(4000)]
    weighted = Rendezvous(["a", "b", "c"], {"a": 2})
    share = sum(weighted.pick(k) == "a" for k in keys) / len(keys)
    assert 0.45 < share < 0.55  # 2 / (2 + 1 + 1)
    assert [Rendezvous(["a", "b", "c"]).pick(k) for k in keys] == [Rendezvous(["c", "a", "b"]).pick(k) for k in keys]


# -- readonly, combined write_to ---------------------------------------------------------


async def test_readonly_refuses_every_write_before_storing() -> None:
    config = {"blobservices": {"store": "memory://", "default": {"type": "readonly", "backend": "store"}},
              "directoryservices": {"store": "memory://", "default": "readonly://store"}}
    async with load_container(config) as container:
        ro, store = container.blob_service(), container.blob_service("store")
        digest = await store.put(b"hello")
        assert await ro.read_bytes(digest) == b"hello" and await ro.chunks(digest) == []
        with pytest.raises(UnsupportedOperationError, match="blob service 'store' is read-only"):
            await ro.put(b"new")
        assert not await store.has(blake3_digest(b"new"))
        rod = container.directory_service()
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            await rod.put(DIRECTORY_A)
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            await rod.put_closure(CLOSURE_D)
        assert await container.directory_service("store").get(DIRECTORY_A.digest) is None


async def test_combined_write_to(stopped_server: str) -> None:
    def config(write_to: str, remote: Any = "memory://") -> dict[str, Any]:
        return {"blobservices": {"local": "memory://", "remote": remote,
                                 "default": {"type": "combined", "local": "local", "remote": "remote",
                                             "write_to": write_to}}}

    for write_to, where in (("local", {"local"}), ("remote", {"remote"}), ("both", {"local", "remote"})):
        async with load_container(config(write_to)) as container:
            digest = await container.blob_service().put(b"x" * 1000)
            assert {n for n in ("local", "remote") if await container.blob_service(n).has(digest)} == where
    async with load_container(config("both", _grpc(stopped_server))) as container:
        with pytest.raises(StorageError, match="side 'remote'"):
            await container.blob_service().put(b"not reported")
        assert not await container.blob_service("local").has(blake3_digest(b"not reported"))


# -- bounded memory stores ---------------------------------------------------------------


async def test_memory_blob_eviction_keeps_the_most_recently_used() -> None:
    async with load_container({"blobservices": {"default": "memory://?max_bytes=10000"}}) as container:
        store = container.blob_service()
        blobs = {await store.put(data): data for data in (os.urandom(1000) for _ in range(30))}
        order = list(blobs)
        # refresh two early blobs by reading them while they are still present
        keep = order[22]
        for digest in order[25:]:
            assert await store.read_bytes(digest) == blobs[digest]
        assert await store.read_bytes(keep) == blobs[keep]
        for data in (os.urandom(1000) for _ in range(5)):
            digest = await store.put(data)
            blobs[digest] = data
            order.append(digest)
        present = [d for d in blobs if await store.has(d)]
        assert sum(len(blobs[d]) for d in present) <= 10000 == store.max_bytes  # type: ignore[attr-defined]
        assert set(order[-5:]) <= set(present) and keep in present
        assert order[0] not in present and await store.open_read(order[0]) is None
        for digest in present:
            assert await store.read_bytes(digest) == blobs[digest]  # never wrong bytes
        with pytest.raises(StorageError, match="exceeds this store's max_bytes"):
            await store.put(os.urandom(10001))


async def test_memory_directory_eviction_and_a_bounded_cache() -> None:
    config = {"directoryservices": {"near": "memory://?max_entries=3", "far": "memory://",
                                    "default": {"type": "cache", "near": "near", "far": "far"}},
              "blobservices": {"local": "memory://?max_bytes=2500", "remote": "memory://",
                               "default": {"type": "combined", "local": "local", "remote": "remote",
                                           "write_to": "both"}}}
    async with load_container(config) as container:
        near = container.directory_service("near")
        leaves = [_leaf(i) for i in range(6)]
        for leaf in leaves[:3]:
            await near.put(leaf)
        assert await near.get(leaves[0].digest) == leaves[0]  # refreshed
        for leaf in leaves[3:5]:
            await near.put(leaf)
        assert [await near.get(x.digest) is not None for x in leaves[:5]] == [True, False, False, True, True]
        cache = container.directory_service()
        for leaf in leaves:
            await cache.put(leaf)
        for leaf in leaves:  # evicted from near, served from far and put back
            assert await cache.get(leaf.digest) == leaf
        combined = container.blob_service()
        data = [os.urandom(1000) for _ in range(5)]
        digests = [await combined.put(d) for d in data]
        for digest, blob in zip(digests, data):  # the bounded local side is a cache: remote has all
            assert await combined.read_bytes(digest) == blob


# -- property: random configs with every reference form ----------------------------------

_names = st.sampled_from(["a", "b", "c", "default"])
_urls = st.sampled_from(["memory://", "readonly+memory://", "readonly://a", "mirrored://?member=memory://&member=b",
                         "sharded://?shard=a&shard=memory://"])
_bad = st.sampled_from(["nope", "x://", "", "memory://x", "mirrored://?member=a", "memory://?max_bytes=64",
                        "memory://?max_entries=2"]) | st.integers() | st.none()


def _section(kind: str, refs: Any, noisy: bool) -> Any:
    """Sections of every combinator and reference form; ``noisy`` mixes in wrong values and types."""
    ref_lists: Any = st.lists(refs, min_size=1 if noisy else 2, max_size=4)
    ref_maps: Any = st.dictionaries(st.sampled_from(["k", "l", "m"]), refs, min_size=1, max_size=3) | ref_lists
    optional: dict[str, Any] = {
        "memory": {"max_bytes" if kind == "blobservices" else "max_entries": st.integers(1, 100)},
        "combined": {"write_to": st.sampled_from(["local", "remote", "both"]), "populate_local": st.booleans()},
    }
    if noisy:
        ref_lists = ref_lists | refs
        ref_maps = ref_maps | refs
        optional = {
            "memory": {"max_bytes": st.integers(-1, 100) | st.none(), "max_entries": st.integers(-1, 5)},
            "combined": {"write_to": st.sampled_from(["local", "remote", "both", "all", 1]),
                         "populate_local": st.booleans() | st.just("false")},
            "sharded": {"weights": st.dictionaries(st.sampled_from(["a", "k", "memory://"]), st.integers(-1, 3),
                                                   max_size=2)},
        }

    def typed(tag: str, **fields: Any) -> Any:
        return st.fixed_dictionaries({"type": st.just(tag), **fields}, optional=optional.get(tag, {}))

    noise = [_bad, st.fixed_dictionaries({"type": st.sampled_from(["memory", "mirrored", "sharded", "nope"])},
                                         optional={"members": refs, "shards": refs, "backend": ref_lists, "x": refs})]
    instances = st.one_of(
        _urls,
        typed("memory"),
        *([typed("combined", local=refs, remote=refs)] if noisy or kind == "blobservices" else []),
        *([typed("cache", near=refs, far=refs)] if noisy or kind == "directoryservices" else []),
        typed("mirrored", members=ref_lists),
        typed("sharded", shards=ref_maps),
        typed("readonly", backend=refs),
        *(noise if noisy else []),
    )
    # "a" and "b" exist more often than not, so references to them resolve and combinators build.
    return st.builds(lambda base, rest: {**base, **rest},
                     st.sampled_from([{"a": "memory://", "b": "memory://"}, {"a": "memory://"}, {}]),
                     st.dictionaries(st.sampled_from(["c", "default", "a"]), instances, max_size=2))


def _configs(refs: Any, noisy: bool) -> Any:
    return st.fixed_dictionaries({}, optional={kind: _section(kind, refs, noisy)
                                               for kind in ("blobservices", "directoryservices")})


_noisy_configs = _configs(st.one_of(_names, _names, _names, _urls, _urls, _bad), noisy=True)
_clean_configs = _configs(_names | _urls, noisy=False)


def _check(config: dict[str, Any]) -> bool:
    try:
        graph = load_graph(config)
    except ConfigError:
        return False
    container = load_container(config)
    for iid in graph.order:
        assert container.provider(iid)() is not None
    container.close()
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_noisy_configs)
def test_random_configs_with_every_form_raise_config_errors_or_build(config: dict[str, Any]) -> None:
    _check(config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_clean_configs)
def test_random_well_formed_configs_build_or_are_refused_for_a_reason(config: dict[str, Any]) -> None:
    """Well-formed values: refused only for a missing name, a name listed twice, or a cycle."""
    try:
        load_graph(config)
    except (UnknownInstanceError, CycleError):
        return
    except ConfigError as e:
        assert "is listed twice" in str(e), str(e)
        return
    assert _check(config)


async def test_embedded_eviction_keeps_the_bound_and_shared_chunks(tmp_path: Path) -> None:
    config = {"blobservices": {"default": {"type": "embedded", "path": str(tmp_path / "c"), "avg_chunk_size": 4096,
                                           "max_bytes": 200_000}}}
    shared = os.urandom(40_000)
    async with load_container(config) as container:
        store = container.blob_service()
        blobs: dict[B3Digest, bytes] = {}
        order: list[B3Digest] = []
        for i in range(12):
            # every other blob shares most of its chunks with the first one
            data = shared + os.urandom(20_000) if i % 2 else os.urandom(30_000 + i)
            digest = await store.put(data)
            blobs[digest] = data
            order.append(digest)
            if i >= 1:  # blob 1 is read after every write: the most recently used
                assert await store.read_bytes(order[1]) == blobs[order[1]]
        present = [d for d in order if await store.has(d)]
        assert sum(len(blobs[d]) for d in present) <= 200_000
        assert set(order[-2:]) <= set(present) and order[1] in present and order[0] not in present
        for digest in present:  # what remains reads back whole: shared chunks were kept
            assert await store.read_bytes(digest) == blobs[digest]
        for digest in order:
            if digest not in present:
                assert await store.open_read(digest) is None
        with pytest.raises(StorageError, match="exceeds this store's max_bytes"):
            await store.put(os.urandom(200_001))
        assert (await store.fsck()).problems == []  # type: ignore[attr-defined]


def _readme_topology() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- topology -->", 1)[1].split("<!-- /topology -->", 1)[0]
    return block.split("```yaml\n", 1)[1].split("```", 1)[0]


async def test_readme_topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's bounded cache over two mirrored servers, from its config alone, against real servers."""
    config = tmp_path / "topology.yaml"
    config.write_text(_readme_topology())
    with CastoreServer() as eu, CastoreServer() as us:
        monkeypatch.setenv("CASTORE_EU", eu.url)
        monkeypatch.setenv("CASTORE_US", us.url)
        monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "cache"))
        data = os.urandom(1 << 20)
        async with load_container(config) as container:
            digest = await container.blob_service().put(data)
            root = await container.directory_service().put_closure(CLOSURE_D)
        for server in (eu, us):  # both remotes hold everything written
            async with container_from_addrs(blob=server.url, directory=server.url) as remote:
                assert await remote.blob_service().read_bytes(digest) == data
                assert len([d async for d in remote.directory_service().get_recursive(root)]) == len(CLOSURE_D)
        us.stop()
        monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "fresh-cache"))  # nothing local
        async with load_container(config) as container:  # us is down: reads keep working from eu
            assert await container.blob_service().read_bytes(digest) == data
            assert await container.directory_service().get(root) == DIRECTORY_D
            with pytest.raises(StorageError, match="member 'us'"):
                await container.blob_service().put(b"needs both remotes")


async def test_cache_with_a_bounded_near_serves_evicted_closures_from_far() -> None:
    config = {"directoryservices": {"near": "memory://?max_entries=3", "far": "memory://",
                                    "default": {"type": "cache", "near": "near", "far": "far"}}}
    async with load_container(config) as container:
        cache = container.directory_service()
        await cache.put_closure(CLOSURE_D)  # 5 directories: near keeps the last 3 written
        near = container.directory_service("near")
        assert await near.get(DIRECTORY_D.digest) == DIRECTORY_D
        with pytest.raises(StorageError):  # near alone has an incomplete closure
            [d async for d in near.get_recursive(DIRECTORY_D.digest)]
        received = [d async for d in cache.get_recursive(DIRECTORY_D.digest)]
        assert {d.digest for d in received} == {d.digest for d in CLOSURE_D} and received[0] == DIRECTORY_D


async def test_sharded_writer_spools_large_blobs_to_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from castore_di.blobservice import sharded

    monkeypatch.setattr(sharded, "SPOOL_MEMORY", 64 * 1024)
    config = {"blobservices": {"default": {"type": "sharded", "shards": {"a": "memory://", "b": "memory://"}}}}
    async with load_container(config) as c:
        store = c.blob_service()
        data = os.urandom(1 << 20)
        writer = store.open_write()
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])
        assert writer._file is not None  # type: ignore[attr-defined]  # spooled past the memory bound
        digest = await writer.close()
        assert await store.read_bytes(digest) == data
        aborted = store.open_write()
        await aborted.write(os.urandom(200_000))
        await aborted.abort()
        assert aborted._file is None  # type: ignore[attr-defined]  # the temporary file is closed
