"""The config toolkit (URL query -> typed fields, shared validators) and ``map_errors``."""

from __future__ import annotations

import pytest

from castore_di.composition import default_registry
from castore_di.errors import (
    ConfigError,
    IntegrityError,
    InvalidNameError,
    StorageError,
    ValidationError,
    describe,
    map_errors,
)

REPEATED = [
    ("blobservices", "embedded:///x?durability=full&durability=process"),
    ("directoryservices", "embedded:///x?compression=none&compression=none"),
    ("blobservices", "objectstore+s3://bucket/p?region=a&region=b"),
    ("directoryservices", "objectstore+memory:///?a=1&a=1"),
    ("directoryservices", "bigtable://i?project_id=p&table_name=t&family_name=cf&family_name=cf2"),
    ("directoryservices", "cache://?near=memory://&far=memory://&far=memory://"),
    ("blobservices", "grpc+http://localhost:1?wait-connect=1&wait-connect=1"),
]


@pytest.mark.parametrize(("kind", "url"), REPEATED)
def test_a_repeated_query_key_is_refused_by_every_url_form(kind: str, url: str) -> None:
    with pytest.raises(ConfigError, match="given twice"):
        default_registry().resolve_url(kind, url)


def test_query_values_are_typed_then_checked_by_the_strict_converter() -> None:
    registry = default_registry()
    cfg = registry.resolve_url("directoryservices", "bigtable://i?project_id=p&table_name=t&family_name=cf"
                               "&channel_size=2&timeout=null&is_read_only=true")
    assert (cfg.channel_size, cfg.timeout, cfg.is_read_only) == (2, None, True)  # type: ignore[attr-defined]
    cfg = registry.resolve_url("blobservices", "embedded:///x?sync_interval=0.5&map_size=4096")
    assert (cfg.sync_interval, cfg.map_size) == (0.5, 4096)  # type: ignore[attr-defined]
    for url, message in [
        ("embedded:///x?map_size=big", "map_size='big' is not a valid int"),
        ("embedded:///x?map_size=0", "map_size must be between 1 and"),
        ("embedded:///x?durability=sometimes", "durability: expected one of .process., .full., got str .sometimes."),
        ("embedded:///x?avg_chunk_size=1000", "avg_chunk_size must be between 4096 and 2097152"),
    ]:
        with pytest.raises(ConfigError, match=message):
            registry.resolve_url("blobservices", url)
    with pytest.raises(ConfigError, match="is_read_only='yes' is not true or false"):
        registry.resolve_url("directoryservices", "bigtable://i?project_id=p&table_name=t&family_name=cf&is_read_only=yes")
    with pytest.raises(ConfigError, match="table_name: required field missing"):
        registry.resolve_url("directoryservices", "bigtable://i?project_id=p&family_name=cf")
    with pytest.raises(ConfigError, match="unknown query parameter 'bogus'"):
        registry.resolve_url("directoryservices", "cache://?near=memory://&far=memory://&bogus=1")


class _LibraryError(Exception):
    pass


def test_map_errors_turns_a_library_error_into_ours_with_the_cause_chained() -> None:
    cause = _LibraryError("disk on fire\nsecond line")
    with pytest.raises(StorageError) as info, map_errors({_LibraryError: StorageError}, "store /x: PUT k failed"):
        raise cause
    assert str(info.value) == "store /x: PUT k failed: disk on fire"
    assert info.value.__cause__ is cause


def test_map_errors_rows_may_build_the_exception_and_first_match_wins() -> None:
    table = {KeyError: lambda e: IntegrityError(f"custom {e}"), LookupError: StorageError}
    with pytest.raises(IntegrityError, match="custom 'k'"), map_errors(table):
        raise KeyError("k")
    with pytest.raises(StorageError), map_errors(table):
        raise IndexError("i")
    with pytest.raises(RuntimeError), map_errors(table):  # not in the table: unchanged
        raise RuntimeError("r")


def test_our_errors_pass_an_edge_with_class_and_rule_code_kept_and_context_as_a_note() -> None:
    original = InvalidNameError(b"a/b", "name_contains_slash", "contains '/'")
    with pytest.raises(ValidationError) as info, map_errors({Exception: StorageError}, "importing /src"):
        with map_errors({Exception: StorageError}, "directory /src/d"):
            raise original
    assert info.value is original and info.value.code == "name_contains_slash"
    assert describe(info.value) == f"importing /src: directory /src/d: {original}"
