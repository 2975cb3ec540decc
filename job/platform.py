"""Managed training platforms' container conventions, mapped onto the config.

SageMaker and Vertex AI tell a container where its model, checkpoints and data
must go through environment variables and fixed paths. `platform_overrides`
turns them into config values, and `hyperparameters` lists SageMaker's
hyperparameters; `load_config` merges the two (hyperparameters above the
conventions, as dotted keys exactly like `--set`'s) into one layer above the
config file (the platform knows where things must go on it) and below
`CIFAR_*` variables and `--set` (a user's explicit choice still wins):

SageMaker (detected by `SM_MODEL_DIR`, `TRAINING_JOB_ARN` or
`/opt/ml/input/config/hyperparameters.json`):
  - `export.uri` <- `SM_MODEL_DIR` (default `/opt/ml/model`, uploaded as model.tar.gz)
  - `data.uri` <- `SM_CHANNEL_TRAINING`, else the first `SM_CHANNEL_*`, else
    `/opt/ml/input/data/<channel>`; `data.source` becomes `cifar10`. A channel
    that holds one archive and no batch files means that archive.
  - `checkpoint.uri` <- `/opt/ml/checkpoints` when it exists (SageMaker
    syncs it with `CheckpointConfig.S3Uri`, and copies it back in on a restart)
  - hyperparameters (`hyperparameters.json`, or `SM_HPS`) whose names are
    config keys (`train.epochs`: "3"), typed and merged like `--set` values;
    the names SageMaker's own tooling adds (`sagemaker_*`, `_tuning_*`) are skipped.
Vertex AI (detected by `AIP_MODEL_DIR` or `AIP_CHECKPOINT_DIR`):
  - `export.uri` <- `AIP_MODEL_DIR`, `checkpoint.uri` <- `AIP_CHECKPOINT_DIR`;
    `gs://bucket/path` becomes `/gcs/bucket/path`, the Cloud Storage FUSE
    mount Vertex gives every training container (storage speaks local paths
    and s3:// only).

`write_failure` leaves SageMaker's failure reason in `/opt/ml/output/failure`
(`$SM_OUTPUT_DIR/failure`), which SageMaker shows as the job's FailureReason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from job.errors import ConfigError

SAGEMAKER_ROOT = Path("/opt/ml")
_SM_MARKERS = ("SM_MODEL_DIR", "SM_TRAINING_ENV", "TRAINING_JOB_ARN")
_ARCHIVES = (".tar.gz", ".tgz", ".tar")
# SageMaker's failure file: "the first 1024 characters are shown as the FailureReason".
_FAILURE_LIMIT = 1024


def detect(environ: Mapping[str, str], root: Path | None = None) -> str | None:
    """`"sagemaker"`, `"vertex"` or None. `root` stands in for /opt/ml (tests)."""
    root = SAGEMAKER_ROOT if root is None else root
    if any(name in environ for name in _SM_MARKERS) or (root / "input" / "config" / "hyperparameters.json").is_file():
        return "sagemaker"
    if "AIP_MODEL_DIR" in environ or "AIP_CHECKPOINT_DIR" in environ:
        return "vertex"
    return None


def platform_overrides(environ: Mapping[str, str], root: Path | None = None) -> dict:
    """The detected platform's conventions as a nested config dict (empty when none is detected)."""
    root = SAGEMAKER_ROOT if root is None else root
    found = detect(environ, root)
    if found == "sagemaker":
        return _sagemaker(environ, root)
    if found == "vertex":
        return _vertex(environ)
    return {}


def _sagemaker(environ: Mapping[str, str], root: Path) -> dict:
    out: dict[str, Any] = {"export": {"uri": environ.get("SM_MODEL_DIR") or str(root / "model")}}
    channel = _channel(environ, root)
    if channel is not None:
        out["data"] = {"source": "cifar10", "uri": _channel_uri(Path(channel))}
    if (root / "checkpoints").is_dir():
        out["checkpoint"] = {"uri": str(root / "checkpoints")}
    return out


def _channel(environ: Mapping[str, str], root: Path) -> str | None:
    if environ.get("SM_CHANNEL_TRAINING"):
        return environ["SM_CHANNEL_TRAINING"]
    named = sorted(k for k in environ if k.startswith("SM_CHANNEL_") and environ[k])
    if named:
        return environ[named[0]]
    data = root / "input" / "data"
    if (data / "training").is_dir():
        return str(data / "training")
    try:
        dirs = sorted(p for p in data.iterdir() if p.is_dir())
    except OSError:
        return None
    return str(dirs[0]) if dirs else None


def _channel_uri(path: Path) -> str:
    # A channel copied from `s3://bucket/cifar-10-binary.tar.gz` is a folder
    # holding that one archive; the loader takes the archive, not the folder.
    try:
        entries = list(path.iterdir())
    except OSError:
        return str(path)
    archives = [p for p in entries if p.is_file() and p.name.endswith(_ARCHIVES)]
    if len(archives) == 1 and not any(p.is_dir() or p.name.endswith(".bin") for p in entries):
        return str(archives[0])
    return str(path)


def hyperparameters(environ: Mapping[str, str], root: Path | None = None) -> list[tuple[str, Any]]:
    """SageMaker's hyperparameters that name config keys, in their order, as
    given (SageMaker passes strings); none when not under SageMaker."""
    root = SAGEMAKER_ROOT if root is None else root
    if detect(environ, root) != "sagemaker":
        return []
    path = root / "input" / "config" / "hyperparameters.json"
    try:
        raw = path.read_text() if path.is_file() else environ.get("SM_HPS", "")
        values = json.loads(raw) if raw.strip() else {}
    except (OSError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise ConfigError(f"cannot read SageMaker hyperparameters ({path} or SM_HPS): {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"SageMaker hyperparameters ({path} or SM_HPS) must be a JSON object")
    return [(key, value) for key, value in values.items() if not key.startswith(("sagemaker_", "_"))]


def _vertex(environ: Mapping[str, str]) -> dict:
    out: dict = {}
    if environ.get("AIP_MODEL_DIR"):
        out["export"] = {"uri": _gcs_path(environ["AIP_MODEL_DIR"])}
    if environ.get("AIP_CHECKPOINT_DIR"):
        out["checkpoint"] = {"uri": _gcs_path(environ["AIP_CHECKPOINT_DIR"])}
    return out


def _gcs_path(uri: str) -> str:
    if uri.startswith("gs://"):
        return "/gcs/" + uri.removeprefix("gs://").rstrip("/")
    return uri.rstrip("/") or uri


def failure_file(environ: Mapping[str, str] | None = None, root: Path | None = None) -> Path | None:
    """Where SageMaker looks for the failure reason, or None when not under SageMaker."""
    environ = os.environ if environ is None else environ
    root = SAGEMAKER_ROOT if root is None else root
    if environ.get("SM_OUTPUT_DIR"):
        return Path(environ["SM_OUTPUT_DIR"]) / "failure"
    if detect(environ, root) == "sagemaker" or (root / "output").is_dir():
        return root / "output" / "failure"
    return None


def write_failure(message: str, environ: Mapping[str, str] | None = None, root: Path | None = None) -> None:
    """Leave `message` where SageMaker reports it; does nothing elsewhere, and never raises."""
    path = failure_file(environ, root)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message[:_FAILURE_LIMIT] + "\n")
    except OSError:
        # The error being reported matters more than the report of it.
        pass
