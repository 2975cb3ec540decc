"""`make demo`: train on real CIFAR-10, print the model's test accuracy, serve
it, classify one real test image, stop the service.

Each step is the command a person would type, printed before it runs. The
data comes first: the canonical archive (downloaded once with a progress bar,
MD5-verified, cached), or whatever `CIFAR_DATA__URI` names. Where the
download fails (offline), one line says so and the demo trains on the
built-in synthetic set instead, so it still ends in a prediction; a
`CIFAR_DATA__URI` of the user's own that cannot be read is an error.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from job import sources
from job.config import load_config
from job.errors import DataError, JobError

CONFIG = "configs/demo.yaml"
MODEL = "runs/demo/export/cifar10"
BIN = Path(sys.executable).parent
started = time.monotonic()


def step(*command: str, capture: bool = False) -> str:
    print(f"\n$ {shlex.join(command)}", flush=True)
    done = subprocess.run([str(BIN / command[0]), *command[1:]], stdout=subprocess.PIPE if capture else None,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"demo: `{command[0]} {command[1]}` failed with exit code {done.returncode}")
    if capture:
        print(done.stdout, end="", flush=True)
    return done.stdout


def data() -> sources.Splits:
    cfg = load_config(CONFIG)
    try:
        return sources.load(cfg)
    except DataError as exc:
        if cfg.data.source != "cifar10" or cfg.data.uri is not None:
            raise  # the user's own data: a problem to fix, not to paper over
        print(f"demo: CIFAR-10 could not be downloaded ({exc}); training on the synthetic set instead", flush=True)
        os.environ["CIFAR_DATA__SOURCE"] = "synthetic"
        return sources.load(load_config(CONFIG))


def ask_the_service(splits: sources.Splits) -> None:
    """Start the service on the model just trained, upload the test split's
    first image as a PNG (as a person would), print the answer, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["cifar-serve", "--model-uri", MODEL, "--port", str(port), "--host", "127.0.0.1", "--workers", "1"]
    print(f"\n$ {shlex.join(command)} &", flush=True)
    log = Path("runs/demo/serve.log")
    with open(log, "wb") as out:
        service = subprocess.Popen([str(BIN / command[0]), *command[1:]], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or service.poll() is not None:
                    sys.exit(f"demo: the service did not become ready; its log:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        label = splits.class_names[splits.y_test[0]]
        png = io.BytesIO()
        Image.fromarray(splits.x_test[0]).save(png, format="PNG")
        print(f"$ curl --data-binary @{label}.png -H 'Content-Type: image/png' {url}/predict", flush=True)
        request = urllib.request.Request(url + "/predict", data=png.getvalue(), headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        article = "an" if label[:1].lower() in "aeiou" else "a"
        print(f"(the first image of the test split, which training never saw: {article} {label})")
        print(json.dumps(answer, indent=2))
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)


def main() -> None:
    try:
        splits = data()
    except JobError as exc:
        sys.exit(f"demo: {exc}")
    step("cifar-job", "train", "--config", CONFIG)
    step("cifar-job", "evaluate", "--config", CONFIG, "--model", MODEL, capture=True)
    ask_the_service(splits)
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"\ndemo: done in {minutes}m{seconds:02d}s; the model is in {MODEL}, its curves in runs/demo/checkpoints")


if __name__ == "__main__":
    main()
