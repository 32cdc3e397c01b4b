#!/usr/bin/env python3
"""Regenerate the tvix.castore.v1 Python modules from the .proto files.

Usage: python scripts/gen_proto.py [OUTPUT_ROOT]

The .proto files live in castore_di/proto/tvix/castore/protos/ (the include root is
castore_di/proto, so the files keep the names the reference gives them). grpcio-tools
writes absolute imports (``from tvix.castore.protos import ...``); they are rewritten to
point into this package. With OUTPUT_ROOT the code is written there instead (the test
suite uses that to check that the committed code is up to date). Needs no network.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]

REPO = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = REPO / "castore_di" / "proto"
PROTO_DIR = INCLUDE / "tvix" / "castore" / "protos"
PACKAGE = "castore_di.proto.tvix.castore.protos"


def generate(out_root: pathlib.Path) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(INCLUDE)) for p in PROTO_DIR.glob("*.proto"))
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{INCLUDE}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen_dir = out_root / "tvix" / "castore" / "protos"
    for path in gen_dir.glob("*_pb2*.py*"):
        text = path.read_text()
        text = re.sub(r"^from tvix\.castore\.protos import", f"from {PACKAGE} import", text, flags=re.M)
        text = re.sub(r"^import tvix\.castore\.protos\.(\w+) as", rf"from {PACKAGE} import \1 as", text, flags=re.M)
        path.write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else INCLUDE)
