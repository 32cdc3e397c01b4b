"""The committed generated code matches the .proto files; wire names are the reference's."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

from castore_di.proto import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: pathlib.Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    committed = REPO / "castore_di" / "proto" / "tvix" / "castore" / "protos"
    fresh = tmp_path / "tvix" / "castore" / "protos"
    generated = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert generated, "protoc produced nothing"
    for name in generated:
        assert filecmp.cmp(committed / name, fresh / name, shallow=False), f"{name} is stale: run scripts/gen_proto.py"


def test_wire_names() -> None:
    assert castore_pb2.DESCRIPTOR.package == "tvix.castore.v1"
    assert castore_pb2.DESCRIPTOR.name == "tvix/castore/protos/castore.proto"
    services = {s.full_name for s in rpc_blobstore_pb2.DESCRIPTOR.services_by_name.values()}
    services |= {s.full_name for s in rpc_directory_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {"tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService"}
    stat = rpc_blobstore_pb2.StatBlobResponse.DESCRIPTOR
    assert stat.fields_by_name["chunks"].number == 2 and stat.fields_by_name["bao"].number == 3
    get = rpc_directory_pb2.GetDirectoryRequest.DESCRIPTOR
    assert get.fields_by_name["digest"].containing_oneof.name == "by_what"
