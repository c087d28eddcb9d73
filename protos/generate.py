"""Regenerate the fleetmend.v1 Python package and its mypy stubs from the protos.

Run from anywhere: ``python protos/generate.py``. With ``--check`` it generates
into a temporary directory and exits 1 if the checked-in files differ, which is
how CI detects stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "fleetmend" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins into out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # The mypy plugins are console scripts installed beside this interpreter.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with exit status {status}")


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root)
        for p in (root / "fleetmend" / "v1").iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare freshly generated code with the checked-in files",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / "fleetmend" / "v1").mkdir(parents=True)
        generate(tmp_root)
        fresh = generated_files(tmp_root)

        if args.check:
            current = generated_files(PROTO_ROOT)
            stale = [str(p) for p in fresh if p not in current]
            stale += [str(p) for p in current if p not in fresh]
            stale += [
                str(p)
                for p in fresh
                if p in current
                and not filecmp.cmp(tmp_root / p, PROTO_ROOT / p, shallow=False)
            ]
            if stale:
                print(
                    "generated code is stale: "
                    + ", ".join(sorted(set(stale)))
                    + "; run `make protos` and commit the result",
                    file=sys.stderr,
                )
                return 1
            print("generated code is up to date")
            return 0

        for old in generated_files(PROTO_ROOT):
            (PROTO_ROOT / old).unlink()
        for path in fresh:
            shutil.copyfile(tmp_root / path, PROTO_ROOT / path)
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
