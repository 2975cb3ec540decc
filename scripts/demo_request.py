"""`make demo`'s last step: start the service on the model just trained,
send it one real request (a PNG upload, as a person would), print the
answer, and stop the service."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from PIL import Image  # noqa: E402

from job.data import CLASS_NAMES, synthetic  # noqa: E402

model_uri = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
service = subprocess.Popen(["cifar-serve", "--model-uri", model_uri, "--port", str(port), "--host", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}"
try:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or service.poll() is not None:
                sys.exit("the service did not become ready")
            time.sleep(0.5)
    _, (images, labels) = synthetic(1, 1)
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    request = urllib.request.Request(url + "/predict", data=png.getvalue(), headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    print(f"POST {url}/predict (a {CLASS_NAMES[labels[0]]} from the synthetic test set):")
    print(json.dumps(answer, indent=2))
finally:
    service.send_signal(signal.SIGTERM)
    service.wait(timeout=60)
