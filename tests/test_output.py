"""What the job and the service print is for a person: TensorFlow's C++
start-up lines (CUDA probes that read as failures on a CPU-only host, oneDNN
notices) stay out of it unless --debug."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ServeProcess

BIN = Path(sys.executable).parent
NOISE = ("cuInit", "oneDNN", "absl::InitializeLog", "cuda_platform", "cudart_stub", "cpu_feature_guard")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return env


@pytest.mark.slow
def test_train_and_evaluate_print_no_tensorflow_start_up_lines_unless_debug(tmp_path):
    sets = ["--set", "data.synthetic.train_size=300", "--set", "data.synthetic.test_size=100",
            "--set", "data.validation_size=50", "--set", "train.epochs=1",
            "--set", f"checkpoint.uri={tmp_path}/ckpt", "--set", f"export.uri={tmp_path}/export"]
    train = subprocess.run([BIN / "cifar-job", "train", *sets], capture_output=True, text=True, env=_env())
    assert train.returncode == 0, train.stderr
    evaluate = subprocess.run([BIN / "cifar-job", "evaluate", "--model", f"{tmp_path}/export/cifar10", *sets],
                              capture_output=True, text=True, env=_env())
    assert evaluate.returncode == 0, evaluate.stderr
    for proc in (train, evaluate):
        output = proc.stdout + proc.stderr
        assert not [n for n in NOISE if n in output], output[:2000]
    assert evaluate.stderr == "" and evaluate.stdout.startswith('{"accuracy"')
    # The same command with --debug shows what was hidden: the redirect is what removed it.
    debug = subprocess.run([BIN / "cifar-job", "evaluate", "--debug", "--model", f"{tmp_path}/export/cifar10", *sets],
                           capture_output=True, text=True, env=_env())
    assert debug.returncode == 0 and [n for n in NOISE if n in debug.stderr], debug.stderr[:2000]


@pytest.mark.slow
def test_the_service_log_has_no_tensorflow_start_up_lines(exported_model):
    service = ServeProcess("--model-uri", str(exported_model), "--host", "127.0.0.1", "--workers", "1",
                           command=(BIN / "cifar-serve",), env=_env())
    try:
        service.wait_ready(timeout=120)
    finally:
        service.proc.send_signal(signal.SIGTERM)
        service.proc.wait(timeout=60)
        service.stop(drain=True)
    log = service.output()
    assert "every worker switched from no version to version 1" in log
    assert not [n for n in NOISE if n in log], log[:3000]
