"""Regenerate serve/protos/: TF Serving's PredictionService and ModelService,
and every message they use, as Python modules that import no TensorFlow.

    .venv/bin/python scripts/gen_protos.py [--out serve/protos]

tensorflow-serving-api's modules import `tensorflow.core.framework.*_pb2`,
which runs TensorFlow's whole `__init__` (600 MiB a process) in a service
that only turns JSON into gRPC. Neither wheel ships its .proto files, but
each generated `_pb2` module holds its file's FileDescriptorProto: this
script collects those of the two services' .proto files and of everything
they import (from the tensorflow and tensorflow-serving-api wheels the dev
extra pins), and has grpcio-tools' protoc (`--descriptor_set_in`) generate
the modules again, then moves their imports under `serve.protos.`.

Only the Python modules move: the .proto files keep their names and
packages, so the method paths (/tensorflow.serving.PredictionService/Predict),
the Any type URLs and the bytes on the wire are TF Serving's own, and both
sets of modules can load in one process (the descriptor pool takes the same
file twice when its bytes are the same, as tests/test_protos.py checks).
The .proto files are TensorFlow's and TF Serving's, under the Apache License
2.0, copied beside the modules from the tensorflow wheel.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("tensorflow_serving/apis/prediction_service.proto", "tensorflow_serving/apis/model_service.proto")
# protobuf's own well-known types: its runtime ships their modules.
RUNTIME = "google/protobuf/"
# The top-level Python packages the generated modules import one another from.
IMPORTED = re.compile(r"^from (tensorflow|tensorflow_serving|xla)([. ])", re.MULTILINE)


def closure(names) -> list:
    """The FileDescriptors of `names` and of every file they import, each after what it imports."""
    from google.protobuf import descriptor_pool

    pool, found = descriptor_pool.Default(), {}

    def visit(name: str) -> None:
        if name not in found:
            descriptor = pool.FindFileByName(name)
            for dependency in descriptor.dependencies:
                visit(dependency.name)
            found[name] = descriptor

    for name in names:
        visit(name)
    return list(found.values())


def generate(out: Path) -> list[str]:
    """Write the modules under `out` (replacing what was there); return the .proto files generated."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401 (fills the pool)

    files = closure(SERVICES)
    descriptor_set = descriptor_pb2.FileDescriptorSet(
        file=[descriptor_pb2.FileDescriptorProto.FromString(f.serialized_pb) for f in files])
    ours = [f.name for f in files if not f.name.startswith(RUNTIME)]
    with tempfile.TemporaryDirectory() as tmp:
        set_path, staged = Path(tmp) / "set.binpb", Path(tmp) / "out"
        set_path.write_bytes(descriptor_set.SerializeToString())
        staged.mkdir()
        for flag, names in (("--python_out", ours), ("--grpc_python_out", SERVICES)):
            code = protoc.main(["protoc", f"--descriptor_set_in={set_path}", f"{flag}={staged}", *names])
            if code:
                raise SystemExit(f"gen_protos: protoc {flag} failed ({code})")
        for module in staged.rglob("*.py"):
            module.write_text(IMPORTED.sub(r"from serve.protos.\1\2", module.read_text()))
        for folder in [staged, *(p for p in staged.rglob("*") if p.is_dir())]:
            if folder != staged:
                (folder / "__init__.py").touch()
        for top in staged.iterdir():
            shutil.rmtree(out / top.name, ignore_errors=True)
            shutil.copytree(top, out / top.name)
    import tensorflow

    shutil.copyfile(Path(tensorflow.__file__).parent / "include" / "LICENSE", out / "LICENSE")
    print(f"gen_protos: {len(ours)} .proto files into {out} with grpcio-tools {version('grpcio-tools')}")
    return ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "serve" / "protos")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
