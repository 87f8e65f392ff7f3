"""Regenerate extproc/wire/*_pb2*.py from protos/extproc/wire/*.proto.

The generated modules are committed so that installing the package needs no protoc;
tests/unit/test_wire_conformance.py fails when they drift from the .proto sources.
Run: python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
SOURCES = sorted((PROTO_ROOT / "extproc" / "wire").glob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in SOURCES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # grpc_python_out writes an (empty) *_pb2_grpc.py for every file; keep only the service one.
    for stub in (out_dir / "extproc" / "wire").glob("*_pb2_grpc.py"):
        if not stub.name.startswith("external_processor"):
            stub.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root the extproc/wire/ tree is written under")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
