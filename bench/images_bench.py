"""The images: build time (`make images`, cold with --cold, then cached), size
by `docker image inspect`, and the serving container's time from `docker run`
to its first 200 from /readyz, on an export mounted read-only.

    python bench/images_bench.py [--cold] [--starts 3]

--cold removes both images, their base and Docker's build cache first, so the
build downloads every package again: it takes minutes and empties the cache
other images may use.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import free_port  # noqa: E402

IMAGES = ("cifar10-pipeline-train:dev", "cifar10-pipeline-serve:dev")


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def timed_build() -> float:
    start = time.monotonic()
    subprocess.run(["bash", "scripts/images.sh"], cwd=ROOT, check=True, capture_output=True)
    return time.monotonic() - start


def start_to_ready(model_root: Path) -> float:
    port = free_port()
    start = time.monotonic()
    container = docker("run", "--detach", "--publish", f"127.0.0.1:{port}:8080", "--volume", f"{model_root}:/models:ro",
                       "--env", "SERVE_MODEL_URI=/models/cifar10", IMAGES[1]).strip()
    try:
        while time.monotonic() - start < 300:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("the serving container was not ready within 300 s")
    finally:
        docker("rm", "--force", container)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    results = {}
    if args.cold:
        base = next(line.split()[1] for line in (ROOT / "Dockerfile.serve").read_text().splitlines()
                    if line.startswith("FROM"))
        subprocess.run(["docker", "rmi", "--force", *IMAGES, base], capture_output=True)
        docker("builder", "prune", "--all", "--force")
        results["cold_build_seconds"] = round(timed_build(), 1)
    results["cached_build_seconds"] = round(timed_build(), 1)
    results["size_bytes"] = {image: int(docker("image", "inspect", "-f", "{{.Size}}", image)) for image in IMAGES}

    from job import export, model

    with tempfile.TemporaryDirectory() as root:
        probe = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
        export.export(model.build("simple_cnn"), root, "cifar10", {}, probe)
        Path(root).chmod(0o755)  # TemporaryDirectory is 0700; the image's user 10001 reads the mount
        results["serve_start_to_ready_seconds"] = [round(start_to_ready(Path(root)), 2) for _ in range(args.starts)]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
