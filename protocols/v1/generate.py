"""Regenerate the committed gRPC code from the ``.proto`` files beside this module.

Run ``python -m lorafleet.protocols.v1.generate`` after editing a ``.proto`` file and
commit the result; ``tests/protocols/test_protos.py`` regenerates into a temporary
folder and fails on any difference, so the committed code never drifts from its source.

The ``.proto`` files are compiled as ``lorafleet/protocols/v1/<name>.proto`` (they are
staged under that path in a temporary folder), so the generated modules import each
other as ``from lorafleet.protocols.v1 import x_pb2``, the name they are installed
under. Needs the development tools ``grpcio-tools`` and ``mypy-protobuf`` (``pip install
-e '.[dev]'``); nothing at run time imports this module.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from lorafleet.protocols.errors import LorafleetError

__all__ = ["GENERATED_SUFFIXES", "PROTO_DIR", "generate"]

logger = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
"""The folder holding the ``.proto`` files and their committed generated code."""
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
"""What protoc writes for each ``.proto`` file."""
_PACKAGE_PATH = Path("lorafleet", "protocols", "v1")
_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    """Path of a protoc plugin script: next to this Python first, else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LorafleetError(
            f"protoc plugin {name} not found; install the dev tools: pip install -e '.[dev]'"
        )
    return found


def generate(out_dir: Path | None = None, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every ``.proto`` file in ``proto_dir`` and write the code to ``out_dir``.

    Parameters
    ----------
    out_dir
        Where the generated files go; default ``proto_dir`` itself (the committed copy).
    proto_dir
        Folder holding the ``.proto`` files.

    Returns
    -------
    list[Path]
        The files written, sorted.

    Raises
    ------
    LorafleetError
        grpcio-tools or mypy-protobuf is missing, or protoc rejects a file.

    Examples
    --------
    >>> import tempfile
    >>> written = generate(Path(tempfile.mkdtemp()))  # doctest: +SKIP
    >>> sorted(p.name for p in written)[:2]  # doctest: +SKIP
    ['base_pb2.py', 'base_pb2.pyi']
    """
    target = proto_dir if out_dir is None else Path(out_dir)
    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise LorafleetError(f"no .proto files in {proto_dir}")
    try:
        protoc = importlib.import_module("grpc_tools.protoc")
        well_known = Path(importlib.import_module("grpc_tools").__file__ or "").parent / "_proto"
    except ImportError:
        raise LorafleetError(
            "generating gRPC code needs grpcio-tools; install the dev tools: pip install -e '.[dev]'"
        ) from None
    plugins = [f"--plugin={name}={_plugin(name)}" for name in _PLUGINS]
    with tempfile.TemporaryDirectory(prefix="lorafleet-protoc-") as tmp:
        stage, gen = Path(tmp, "src"), Path(tmp, "gen")
        (stage / _PACKAGE_PATH).mkdir(parents=True)
        gen.mkdir()
        for proto in protos:
            shutil.copyfile(proto, stage / _PACKAGE_PATH / proto.name)
        args = [
            "grpc_tools.protoc",
            f"-I{stage}",
            f"-I{well_known}",
            *plugins,
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--mypy_out={gen}",
            f"--mypy_grpc_out={gen}",
            *(str(_PACKAGE_PATH / p.name) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise LorafleetError(f"protoc failed on {[p.name for p in protos]}; see its output")
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((gen / _PACKAGE_PATH).iterdir()):
            if produced.name.endswith(GENERATED_SUFFIXES):
                shutil.copyfile(produced, target / produced.name)
                written.append(target / produced.name)
    logger.info("generated %d files in %s", len(written), target)
    return written


def main() -> None:
    """Regenerate the committed code in place and list what was written."""
    for path in generate():
        print(path)  # CLI output


if __name__ == "__main__":
    main()
