"""SageMaker's and Vertex AI's container conventions mapped onto the config
(job/platform.py), their place in the precedence (file < platform <
environment < --set), and SageMaker's failure file on a fatal error.

TensorFlow-free: /opt/ml is a temporary folder here (`SAGEMAKER_ROOT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job import cli, platform
from job.config import load_config, merge_dotted, typed
from job.errors import ConfigError, Preempted
from job.platform import detect, platform_overrides, write_failure

REPO = Path(__file__).resolve().parents[1]
_PLATFORM_PREFIXES = ("SM_", "AIP_", "TRAINING_JOB_")


@pytest.fixture(autouse=True)
def on_no_platform(no_cifar_env, monkeypatch, tmp_path):
    """No CIFAR_* variable and no platform's (SM_*, AIP_*, TRAINING_JOB_*) leaks in, and /opt/ml is an
    empty temporary folder: a test is on a platform only as it sets one up."""
    for name in list(os.environ):
        if name.upper().startswith(_PLATFORM_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setattr(platform, "SAGEMAKER_ROOT", tmp_path / "opt-ml")


def opt_ml(tmp_path) -> Path:
    return tmp_path / "opt-ml"


# --- nothing detected ---------------------------------------------------------------


def test_no_platform_no_overrides():
    assert detect({}) is None
    assert platform_overrides({"HOME": "/root", "AWS_BATCH_JOB_ID": "x"}) == {}
    assert load_config().export.uri == "runs/default/export"


# --- SageMaker ------------------------------------------------------------------------


def test_sagemaker_toolkit_variables(tmp_path):
    channel = tmp_path / "training"
    channel.mkdir()
    environ = {"SM_MODEL_DIR": "/opt/ml/model", "SM_CHANNEL_TRAINING": str(channel),
               "SM_CHANNEL_EVAL": "/elsewhere"}
    assert detect(environ) == "sagemaker"
    assert platform_overrides(environ) == {
        "export": {"uri": "/opt/ml/model"},
        "data": {"source": "cifar10", "uri": str(channel)},
    }


def test_sagemaker_takes_the_first_channel_when_none_is_called_training(tmp_path):
    environ = {"SM_MODEL_DIR": "/m", "SM_CHANNEL_TRAIN": "/data/train", "SM_CHANNEL_CIFAR": "/data/cifar"}
    assert platform_overrides(environ)["data"] == {"source": "cifar10", "uri": "/data/cifar"}


def test_a_channel_holding_one_archive_means_the_archive(tmp_path):
    channel = tmp_path / "training"
    channel.mkdir()
    (channel / "cifar-10-binary.tar.gz").write_bytes(b"")
    environ = {"SM_MODEL_DIR": "/m", "SM_CHANNEL_TRAINING": str(channel)}
    assert platform_overrides(environ)["data"]["uri"] == str(channel / "cifar-10-binary.tar.gz")
    (channel / "data_batch_1.bin").write_bytes(b"")
    assert platform_overrides(environ)["data"]["uri"] == str(channel)


def test_sagemaker_without_the_toolkit_uses_its_fixed_paths(tmp_path):
    root = opt_ml(tmp_path)
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text("{}")
    (root / "input" / "data" / "training").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    assert detect({}) == "sagemaker"
    cfg = load_config()
    assert cfg.export.uri == str(root / "model")
    assert cfg.checkpoint.uri == str(root / "checkpoints")
    assert (cfg.data.source, cfg.data.uri) == ("cifar10", str(root / "input" / "data" / "training"))


def test_no_checkpoint_folder_leaves_checkpoint_uri_alone(tmp_path):
    assert "checkpoint" not in platform_overrides({"SM_MODEL_DIR": "/m"})


def test_sagemaker_hyperparameters_are_typed_config_keys(tmp_path):
    root = opt_ml(tmp_path)
    (root / "input" / "config").mkdir(parents=True)
    # SageMaker passes every hyperparameter as a string; its SDK and tuner add keys of their own.
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({
        "train.epochs": "3", "train.learning_rate": "0.01", "data.augment": "true", "seed": "7",
        "train.lr_schedule": "cosine", "sagemaker_region": '"us-east-1"', "_tuning_objective_metric": "acc",
    }))
    cfg = load_config()
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.data.augment, cfg.seed) == (3, 0.01, True, 7)
    assert cfg.train.lr_schedule.name == "cosine"


def test_sagemaker_hyperparameters_from_sm_hps(monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/m")
    monkeypatch.setenv("SM_HPS", json.dumps({"train.batch_size": "32"}))
    assert load_config().train.batch_size == 32


def test_an_unknown_hyperparameter_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/m")
    monkeypatch.setenv("SM_HPS", json.dumps({"epochs": "3"}))
    with pytest.raises(ConfigError, match="epochs"):
        load_config()


def test_unreadable_hyperparameters_are_a_config_error(monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/m")
    monkeypatch.setenv("SM_HPS", "{not json")
    with pytest.raises(ConfigError, match="hyperparameters"):
        load_config()


# --- Vertex AI ------------------------------------------------------------------------


def test_vertex_output_directories_through_the_gcs_mount():
    environ = {"AIP_MODEL_DIR": "gs://bucket/run-7/model/", "AIP_CHECKPOINT_DIR": "gs://bucket/run-7/checkpoints/"}
    assert detect(environ) == "vertex"
    assert platform_overrides(environ) == {
        "export": {"uri": "/gcs/bucket/run-7/model"},
        "checkpoint": {"uri": "/gcs/bucket/run-7/checkpoints"},
    }


def test_vertex_local_paths_pass_through():
    assert platform_overrides({"AIP_CHECKPOINT_DIR": "/mnt/ckpt/"}) == {"checkpoint": {"uri": "/mnt/ckpt"}}


# --- precedence -----------------------------------------------------------------------


def test_platform_beats_the_file_and_loses_to_environment_and_set(tmp_path, monkeypatch):
    path = tmp_path / "job.yaml"
    path.write_text("export:\n  uri: /from/file\ncheckpoint:\n  uri: /from/file/ckpt\ntrain:\n  epochs: 4\n")
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/model")
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://b/ckpt")
    cfg = load_config(path)
    assert (cfg.export.uri, cfg.checkpoint.uri, cfg.train.epochs) == ("/gcs/b/model", "/gcs/b/ckpt", 4)

    monkeypatch.setenv("CIFAR_EXPORT__URI", "s3://from-env/export")
    cfg = load_config(path, ["checkpoint.uri=s3://from-set/ckpt"])
    assert (cfg.export.uri, cfg.checkpoint.uri) == ("s3://from-env/export", "s3://from-set/ckpt")


def test_hyperparameters_lose_to_environment_and_set(monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/m")
    monkeypatch.setenv("SM_HPS", json.dumps({"train.epochs": "3", "train.batch_size": "32"}))
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "5")
    cfg = load_config(None, ["train.batch_size=16"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 16)


def test_platform_false_leaves_the_platform_out(monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    assert load_config().export.uri == "/opt/ml/model"
    assert load_config(platform=False).export.uri == "runs/default/export"


# --- SageMaker's failure file ---------------------------------------------------------


def test_write_failure_under_sagemaker(tmp_path):
    out = tmp_path / "output"
    write_failure("x" * 5000, environ={"SM_OUTPUT_DIR": str(out)})
    assert (out / "failure").read_text() == "x" * 1024 + "\n"  # SageMaker shows the first 1024 characters

    root = opt_ml(tmp_path)
    write_failure("boom", environ={"SM_MODEL_DIR": "/m"})
    assert (root / "output" / "failure").read_text() == "boom\n"


def test_write_failure_elsewhere_writes_nothing(tmp_path):
    write_failure("boom", environ={})
    assert not opt_ml(tmp_path).exists()


def test_write_failure_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    write_failure("boom", environ={"SM_OUTPUT_DIR": str(blocker / "sub")})


def _cli(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CIFAR_", *_PLATFORM_PREFIXES))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_config_error_under_sagemaker_leaves_the_failure_file(tmp_path):
    out = tmp_path / "output"
    proc = _cli(tmp_path, "check-config", "--set", "train.epochs=0",
                SM_MODEL_DIR=str(tmp_path / "model"), SM_OUTPUT_DIR=str(out))
    assert proc.returncode == 2, proc.stderr
    assert "train.epochs" in (out / "failure").read_text()


def test_check_config_under_sagemaker_shows_the_mapped_locations(tmp_path):
    proc = _cli(tmp_path, "check-config", SM_MODEL_DIR="/opt/ml/model", SM_CHANNEL_TRAINING="/opt/ml/input/data/t",
                SM_OUTPUT_DIR=str(tmp_path / "output"))
    assert proc.returncode == 0, proc.stderr
    assert "uri: /opt/ml/model" in proc.stdout and "source: cifar10" in proc.stdout
    assert not (tmp_path / "output" / "failure").exists()


def test_no_failure_file_for_a_preempted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path))

    def preempted(args):
        raise Preempted("stopped by SIGTERM after committing checkpoint 40")

    monkeypatch.setattr(cli, "_dispatch", preempted)
    assert cli.main(["check-config"]) == 75
    assert not (tmp_path / "failure").exists()


def test_an_unexpected_error_leaves_the_failure_file_and_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path))

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dispatch", bug)
    with pytest.raises(RuntimeError):
        cli.main(["check-config"])
    assert (tmp_path / "failure").read_text() == "RuntimeError: a bug\n"


# --- the precedence table in docs/training.md, checked ------------------------------


class Layers:
    """Values set in the layers of the config's precedence, each the way a user sets it there."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.file: list[tuple[str, str]] = []
        self.hyperparameters: dict[str, str] = {}
        self.sets: list[str] = []

    def set(self, layer: str, key: str, value: str) -> None:
        if layer == "config file":
            self.file.append((key, value))
        elif layer == "platform conventions":
            self.hyperparameters[key] = value
        elif layer == "environment":
            self.monkeypatch.setenv("CIFAR_" + key.upper().replace(".", "__"), value)
        else:
            assert layer == "`--set`", layer
            self.sets.append(f"{key}={value}")

    def resolve(self):
        path = None
        if self.file:
            path = self.tmp_path / "job.yaml"
            path.write_text(yaml.safe_dump(merge_dotted((k, typed(v)) for k, v in self.file)))
        if self.hyperparameters:
            config = opt_ml(self.tmp_path) / "input" / "config"
            config.mkdir(parents=True, exist_ok=True)
            (config / "hyperparameters.json").write_text(json.dumps(self.hyperparameters))
        return load_config(path, self.sets)


def documented_precedence() -> list[tuple[str, str]]:
    """(layer, what sets it) from the precedence table in docs/training.md, lowest first."""
    lines = (REPO / "docs" / "training.md").read_text().splitlines()
    start = lines.index("| precedence | layer | what sets it |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip("|").split("|")[1:3]))
    return rows


SETTABLE = ["config file", "platform conventions", "environment", "`--set`"]
# Each platform convention the precedence table places in the platform layer, as it sets export.uri.
PLATFORM_EXPORT = {
    "SM_MODEL_DIR": {"SM_MODEL_DIR": "/platform"},
    "AIP_MODEL_DIR": {"AIP_MODEL_DIR": "/platform"},
    "hyperparameters": {"SM_HPS": json.dumps({"export.uri": "/platform"}), "SM_MODEL_DIR": "/below-hyperparameters"},
}


def test_the_precedence_table_lists_the_layers_lowest_first():
    rows = documented_precedence()
    assert [layer for layer, _ in rows] == ["defaults", *SETTABLE]
    where = dict(rows)
    for name in (*PLATFORM_EXPORT, "SM_CHANNEL_*", "AIP_CHECKPOINT_DIR"):
        assert name in where["platform conventions"], name
    assert "CIFAR_" in where["environment"] and "AWS Batch" in where["environment"]
    assert "submit aws-batch" in where["`--set`"]


@pytest.mark.parametrize("convention", PLATFORM_EXPORT)
@pytest.mark.parametrize("low, high", [(a, b) for i, a in enumerate(SETTABLE) for b in SETTABLE[i + 1:]])
def test_a_higher_layer_of_the_precedence_table_wins(tmp_path, monkeypatch, convention, low, high):
    layers = Layers(tmp_path, monkeypatch)
    for layer in (low, high):
        if layer == "platform conventions":
            for name, value in PLATFORM_EXPORT[convention].items():
                monkeypatch.setenv(name, value)
        else:
            layers.set(layer, "export.uri", f"/{layer.strip('`')}")
    expected = "/platform" if high == "platform conventions" else f"/{high.strip('`')}"
    assert layers.resolve().export.uri == expected


# Within one layer too, where it takes both keys at once: the environment has
# no order and a file's mapping holds one value per key.
ORDERED = ["platform conventions", "`--set`"]


@pytest.mark.parametrize("name_in, parameter_in",
                         [(a, b) for a in SETTABLE for b in SETTABLE if a != b or a in ORDERED])
def test_a_named_schedule_and_its_parameter_from_any_layers_in_either_order(tmp_path, monkeypatch,
                                                                             name_in, parameter_in):
    keys = {"name": (name_in, "train.lr_schedule", "cosine"),
            "parameter": (parameter_in, "train.lr_schedule.warmup_epochs", "2")}
    for order in (["name", "parameter"], ["parameter", "name"]):
        layers = Layers(tmp_path, monkeypatch)
        for which in order:
            layers.set(*keys[which])
        schedule = layers.resolve().train.lr_schedule
        assert (schedule.name, schedule.warmup_epochs) == ("cosine", 2.0), order
