"""`cifar-job` (`python -m job`) as a user runs it: exit codes, what lands on
stdout and stderr, and no traceback unless `--debug`.

`check-config` must not import TensorFlow (it answers in well under a second);
the few `train`/`evaluate` runs here each pay TensorFlow's ~4 s import and
fail before any training starts.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import clean_env, cli

REPO = Path(__file__).resolve().parents[1]
RECORD_BYTES = 1 + 3 * 32 * 32
BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def error_lines(stderr: str) -> list[str]:
    """stderr from `cifar-job: error:` on (TensorFlow's own start-up chatter precedes it)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("cifar-job: error:")]
    assert starts, f"no 'cifar-job: error:' line in stderr:\n{stderr}"
    return lines[starts[0]:]


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str, max_lines: int = 4) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    message = "\n".join(error_lines(proc.stderr))
    assert len(message.splitlines()) <= max_lines, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- check-config -----------------------------------------------------------------


def test_check_config_prints_the_resolved_defaults_without_importing_tensorflow(tmp_path):
    # -X importtime lists every module the process imports, on stderr.
    proc = cli(tmp_path, "check-config", python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "job" in imported  # the listing is real
    assert "tensorflow" not in imported and "keras" not in imported
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["model"]["name"] == "simple_cnn"
    assert resolved["train"]["optimizer"] == "adam"
    assert resolved["train"]["learning_rate"] == 0.001
    assert resolved["train"]["lr_schedule"] == {"name": "constant"}
    assert (resolved["train"]["batch_size"], resolved["train"]["epochs"]) == (64, 10)
    assert resolved["data"]["augment"] is False
    assert resolved["export"]["model_name"] == "cifar10"


def test_check_config_applies_file_environment_and_set_in_that_order(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "seed: 5\ntrain:\n  epochs: 4\n  batch_size: 32\n  optimizer: sgd\n  lr_schedule: cosine\n"
    )
    env = clean_env(CIFAR_TRAIN__EPOCHS="3", CIFAR_TRAIN__BATCH_SIZE="16")
    proc = cli(tmp_path, "check-config", "--config", "job.yaml",
               "--set", "train.epochs=7", "--set", "train.lr_schedule.warmup_epochs=1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    train = yaml.safe_load(proc.stdout)["train"]
    assert train["epochs"] == 7  # --set beats the environment
    assert train["batch_size"] == 16  # the environment beats the file
    assert train["optimizer"] == "sgd"  # the file beats the defaults
    assert train["lr_schedule"] == {"name": "cosine", "warmup_epochs": 1.0, "final_fraction": 0.0}
    assert yaml.safe_load(proc.stdout)["seed"] == 5


def test_check_config_output_is_itself_a_valid_config(tmp_path):
    first = cli(tmp_path, "check-config", "--set", "model.name=resnet", "--set", "train.max_steps=20")
    assert first.returncode == 0, first.stderr
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    second = cli(tmp_path, "check-config", "--config", "resolved.yaml")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


# --- config and usage errors: exit 2 ---------------------------------------------------


def test_invalid_config_exits_2_naming_the_field_without_traceback(tmp_path):
    proc = cli(tmp_path, "check-config", "--set", "train.epochs=0")
    message = assert_clean_error(proc, 2, "train.epochs")
    assert proc.stdout == ""
    assert message.startswith("cifar-job: error: invalid config")


def test_unknown_key_in_file_and_environment_exit_2(tmp_path):
    (tmp_path / "job.yaml").write_text("train:\n  epoch: 3\n")
    assert_clean_error(cli(tmp_path, "check-config", "--config", "job.yaml"), 2, "train.epoch")
    env = clean_env(CIFAR_TRAIN__EPOCH="3")
    assert_clean_error(cli(tmp_path, "check-config", env=env), 2, "train.epoch")


def test_config_file_problems_exit_2(tmp_path):
    assert_clean_error(cli(tmp_path, "check-config", "--config", "missing.yaml"), 2, "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1\n")
    assert_clean_error(cli(tmp_path, "check-config", "--config", "broken.yaml"), 2, "broken.yaml", max_lines=12)
    assert_clean_error(cli(tmp_path, "check-config", "--config", "."), 2, "config file")


def test_malformed_set_exits_2(tmp_path):
    assert_clean_error(cli(tmp_path, "check-config", "--set", "train.epochs"), 2, "KEY=VALUE", "train.epochs")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli(tmp_path, "check-config", "--debug", "--set", "train.optimizer=rmsprop")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr
    assert "train.optimizer" in proc.stderr


@pytest.mark.parametrize("args", [
    (),  # no subcommand
    ("frobnicate",),  # unknown subcommand
    ("evaluate",),  # --model is required
    ("check-config", "--set"),  # --set without its value
    ("check-config", "--no-such-flag"),
    ("check-config", "--log-format", "xml"),
    ("fetch-data", "--to"),  # --to without its URI
])
def test_usage_errors_exit_2(tmp_path, args):
    proc = cli(tmp_path, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_exits_0(tmp_path):
    proc = cli(tmp_path, "--help")
    assert proc.returncode == 0
    for command in ("train", "check-config", "fetch-data", "evaluate"):
        assert command in proc.stdout


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "cifar-job"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    proc = subprocess.run([str(script), "check-config", "--set", "train.epochs=3"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["epochs"] == 3


# --- data errors: exit 3 (each of these imports TensorFlow) ------------------------------


def cifar10_args(tmp_path: Path, uri: Path) -> list[str]:
    return ["--set", "data.source=cifar10", "--set", f"data.uri={uri}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.validation_size=1",
            "--set", f"checkpoint.uri={tmp_path / 'ckpt'}", "--set", f"export.uri={tmp_path / 'export'}"]


def write_binary_batches(folder: Path, records: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in BATCHES:
        body = b"".join(struct.pack("B", i % 10) + bytes([i % 256]) * (RECORD_BYTES - 1) for i in range(records))
        (folder / name).write_bytes(body)


@pytest.mark.slow
def test_train_with_missing_data_exits_3_naming_the_path(tmp_path):
    missing = tmp_path / "missing"
    proc = cli(tmp_path, "train", *cifar10_args(tmp_path, missing))
    assert_clean_error(proc, 3, str(missing))
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_train_with_truncated_batch_exits_3_naming_the_file(tmp_path):
    data = tmp_path / "cifar"
    write_binary_batches(data)
    batch = data / "data_batch_1.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    proc = cli(tmp_path, "train", *cifar10_args(tmp_path, data))
    assert_clean_error(proc, 3, "data_batch_1.bin", "truncated")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_evaluate_a_missing_model_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = cli(tmp_path, "evaluate", "--model", str(missing))
    assert proc.returncode not in (0, 2), (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert_clean_error(proc, proc.returncode, str(missing))
