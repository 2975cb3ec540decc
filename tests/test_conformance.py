"""`cifar-serve conformance` against the service over real HTTP, on both
backends (TF Serving's through the gRPC stand-in), and against a server that
deviates from TF Serving's behaviour in one answer."""

import contextlib
import json
import shutil
import subprocess
import sys
import threading

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Response

from helpers import free_port, pixels, tamper_probe_record, url_ready, wait_until
from serve.app import create_app
from serve.cli import main
from serve.settings import Settings
from tfserving_standin import FakeTFServing, start_server

PIXELS = pixels(5, seed=5)
KEY = "conformance-key"
# Every check the command runs for this model with --export (the export has both signatures).
CHECKS = ["v1 model status", "v1 metadata", "v1 row format (instances)", "v1 columnar format (inputs)",
          "v1 columnar format, named input", "v1 versioned route /versions/1",
          "v1 predict_image_bytes with b64 PNGs, row format", "v1 predict_image_bytes with b64 PNGs, columnar format",
          "v2 server metadata (GET /v2)", "v2 health and model readiness", "v2 model metadata", "v2 infer, JSON",
          "v2 infer, binary tensor extension and binary_data_output", "v2 versioned infer /versions/1",
          "error: malformed JSON (v1)", "error: wrong image shape (v1)", "error: unknown signature_name (v1)",
          "error: unknown model (v1 status)", "error: unknown model (v1 predict)",
          "error: unknown version (v1 predict)", "error: malformed JSON (v2 infer)",
          "error: wrong image shape (v2 infer)", "error: unknown model (v2 metadata)",
          "error: unknown version (v2 metadata)", "the same answers from every route",
          "answers equal the export's probe record"]


@pytest.fixture(scope="module")
def exported(exported_model):
    """The version directory of one exported model, with its probe record."""
    return str(exported_model / "1")


@contextlib.contextmanager
def serving(app):
    """`app` on a real socket; yields its URL once it is ready."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        wait_until(lambda: url_ready(url + "/readyz"), timeout=30)
        yield url
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def inprocess(exported):
    """The in-process backend, with API keys on: the command must send its key to every protected route."""
    app = create_app(Settings(model_uri=str(exported.rsplit("/", 1)[0]), poll_seconds=0.2, api_keys=[KEY]))
    yield app
    app.extensions["predictor"].backend.close()


def conformance(capsys, *args):
    code = main(["conformance", *args])
    return code, capsys.readouterr().out.splitlines()


def passed(lines):
    return [line.split(None, 1)[1] for line in lines if line.startswith("ok ")]


@pytest.mark.slow
def test_the_in_process_backend_conforms(inprocess, exported, capsys):
    with serving(inprocess) as url:
        code, lines = conformance(capsys, url, "--export", exported, "--api-key", KEY)  # name from the server
        keyless = main(["conformance", url])
    assert code == 0, "\n".join(lines)
    assert passed(lines) == CHECKS and lines[-1].endswith(f"{len(CHECKS)} ok, 0 failed")
    assert keyless == 2 and "pass --api-key" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tf_serving_backend_conforms(exported, capsys):
    fake = FakeTFServing(exported)
    grpc_server, port = start_server(fake)
    app = create_app(Settings(backend="tfserving", tfserving_address=f"127.0.0.1:{port}", model_name="cifar10",
                              poll_seconds=0.05))
    try:
        with serving(app) as url:
            code, lines = conformance(capsys, url, "--model", "cifar10", "--export", exported)
            # Without --export: generated images, and no probe record to compare with.
            bare_code, bare = conformance(capsys, url, "--model", "cifar10")
    finally:
        app.extensions["predictor"].backend.close()
        grpc_server.stop(grace=None)
    assert code == 0, "\n".join(lines)
    assert passed(lines) == CHECKS
    assert bare_code == 0, "\n".join(bare)
    assert passed(bare) == CHECKS[:-1]


def altered(app, path_part, alter):
    """`app`, with `alter(answer) -> answer` applied to the JSON answers of paths containing `path_part`."""
    def wsgi(environ, start_response):
        response = Response.from_app(app, environ)
        if path_part in environ["PATH_INFO"]:
            response.set_data(json.dumps(alter(json.loads(response.get_data()))))
        return response(environ, start_response)
    return wsgi


def nudge_first_probability(answer):
    answer["predictions"][0]["probabilities"][0] += 0.01
    return answer


def error_as_message(answer):
    return {"message": answer["error"]} if "error" in answer else answer


def bare_row_answer(answer):  # the answer this service gave before: as if the signature had one output
    if "predictions" in answer:
        answer["predictions"] = [p["probabilities"] for p in answer["predictions"]]
    return answer


@pytest.mark.parametrize("path_part, alter, failed, says", [
    ("/versions/1:predict", nudge_first_probability, "the same answers from every route",
     "v1 versioned: probabilities differs by up to 0.01"),
    ("-not-served", error_as_message, "error: unknown model (v1 status)", 'the body is not {"error": "<message>"}'),
    (":predict", bare_row_answer, "v1 row format (instances)", "must be an object keyed by"),
], ids=["numbers", "error-form", "row-form"])
def test_a_server_that_deviates_fails_the_check_that_sees_it(inprocess, capsys, path_part, alter, failed, says):
    with serving(altered(inprocess, path_part, alter)) as url:
        code, lines = conformance(capsys, url, "--model", "cifar10", "--api-key", KEY)
    assert code == 1
    failures = [line for line in lines if line.startswith("FAIL ")]
    assert failures and failures[0].startswith(f"FAIL {failed}: ") and says in failures[0], "\n".join(lines)
    assert f"failed ({failed}" in lines[-1]


def test_answers_unlike_the_exports_probe_record_fail(inprocess, exported, tmp_path, capsys):
    # Another export's record for the same probe images: what TF Serving would answer for that SavedModel.
    other = tmp_path / "cifar10" / "1"
    shutil.copytree(f"{exported}/assets.extra", other / "assets.extra")
    tamper_probe_record(other)  # 0.001 more for the first class
    with serving(inprocess) as url:
        code, lines = conformance(capsys, url, "--export", str(other), "--api-key", KEY)
    assert code == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL answers equal the export's probe record: served version 1 (v1 row): "
        "probabilities differs by up to 0.001 (allowed 0.0001)"]


def test_usage_errors_and_an_unreachable_server_exit_2(tmp_path):
    command = [sys.executable, "-m", "serve", "conformance"]
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "2 usage error" in " ".join(helped.stdout.split())
    down = subprocess.run([*command, f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True)
    assert down.returncode == 2 and "no answer from" in down.stderr
    no_record = subprocess.run([*command, "http://127.0.0.1:1", "--export", str(tmp_path)], capture_output=True,
                               text=True)
    assert no_record.returncode == 2 and "no probe record" in no_record.stderr
