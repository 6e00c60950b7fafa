#!/usr/bin/env python3
"""Generate mtpdist/wire/v1/*_pb2*.py from proto/; `--check` fails if they have drifted."""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "mtpdist" / "wire"  # proto/mtpdist/v1/x.proto -> mtpdist/wire/v1/x_pb2.py


def generate(dest: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
               f"--grpc_python_out={tmp}", *map(str, protos)]
        subprocess.run(cmd, check=True)
        made = []
        for f in Path(tmp).rglob("*_pb2*.py"):
            rel = f.relative_to(Path(tmp) / "mtpdist")  # v1/worker_pb2.py
            text = f.read_text().replace("from mtpdist.v1 import", "from mtpdist.wire.v1 import")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            made.append(target)
        return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if checked-in code differs")
    args = ap.parse_args()
    if not args.check:
        for f in generate(OUT):
            print(f"wrote {f.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        drift = [f.relative_to(tmp) for f in generate(Path(tmp))
                 if not (OUT / f.relative_to(tmp)).is_file() or not filecmp.cmp(f, OUT / f.relative_to(tmp), shallow=False)]
    if drift:
        print("generated protobuf code is out of date; run scripts/gen_proto.py:", *drift, file=sys.stderr)
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
