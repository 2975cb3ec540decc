"""The fixtures every test file may ask for; what is not a fixture is in helpers.py."""

import io
import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from helpers import PROBE, SECRET, ArchiveServer, wait_until  # noqa: E402



@pytest.fixture
def run_job():
    """Train in-process; returns (Result, console output)."""
    from job import controller
    from job.config import load_config
    from job.report import Console

    def run(overrides: list[str]):
        out = io.StringIO()
        result = controller.run(load_config(None, overrides), Console("text", stream=out))
        return result, out.getvalue()

    return run


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory):
    """An untrained simple_cnn exported once per session, as the job exports it, as version 1 of
    `cifar10` with PROBE as its probe batch: the model folder (what SERVE_MODEL_URI names), version 1
    at `exported_model / "1"`. Shared: a test that publishes more versions does so in a folder of its own."""
    from job import export, model

    root = tmp_path_factory.mktemp("exported")
    export.export(model.build("simple_cnn"), str(root), "cifar10", {}, PROBE)
    return root / "cifar10"


@pytest.fixture(scope="module")
def app(exported_model):
    """The Flask app serving exported_model in-process, ready; its model watcher closed after the module."""
    from serve.app import create_app
    from serve.settings import Settings

    app = create_app(Settings(model_uri=str(exported_model), poll_seconds=0.2))
    client = app.test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200, what="the app to be ready")
    yield app
    app.extensions["predictor"].backend.close()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture
def make_app():
    """create_app(settings, ...) for one test: every app it made has its model watcher closed when the test
    ends, so none loads models beside later tests (or polls storage whose settings are gone)."""
    from serve.app import create_app

    made = []

    def make(settings, **kwargs):
        made.append(create_app(settings, **kwargs))
        return made[-1]

    yield make
    for app in made:
        app.extensions["predictor"].backend.close()


@pytest.fixture
def no_cifar_env(monkeypatch):
    """No CIFAR_* variable from the outer environment reaches the test (helpers.clean_env is the same
    environment for a subprocess)."""
    for name in list(os.environ):
        if name.upper().startswith("CIFAR_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode), in MinIO's place."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """boto3 pointed at the local endpoint the way compose points it at MinIO; a fresh bucket."""
    import uuid

    import boto3

    for name, value in {"AWS_ENDPOINT_URL_S3": s3_server, "AWS_ACCESS_KEY_ID": "testing-key",
                        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def server():
    """A local HTTP server standing in for a data set's host (there is no internet here)."""
    httpd = ArchiveServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (_executable(CHROMIUM) and _executable(CHROMEDRIVER)):
        pytest.skip("needs Debian packages chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=900,1100",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
