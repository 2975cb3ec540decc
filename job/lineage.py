"""The model card's lineage (common/card.py), collected where the job runs:
the code's git revision, the image, the platform's job ids, the data and
checkpoint locations (redacted), the creation time and the versions.

The environment variables it reads:
  - `CIFAR_CODE_REVISION`: the commit, baked into both images at build time
    (scripts/images.sh); a git checkout the job runs from takes precedence
  - `CIFAR_IMAGE`: the image reference, set by whoever starts the container
    (`cifar-job submit aws-batch`, infra/k8s, docker-compose.yml)
  - AWS Batch's `AWS_BATCH_JOB_ID` and `AWS_BATCH_JOB_ATTEMPT`; SageMaker's
    `TRAINING_JOB_NAME` and `TRAINING_JOB_ARN`; Vertex AI's `CLOUD_ML_JOB_ID`
  - Kubernetes' downward API, as infra/k8s sets them: `CIFAR_K8S_JOB_NAME`,
    `CIFAR_K8S_POD_NAME`, `CIFAR_K8S_NAMESPACE`
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from common.card import Data, Job, Lineage
from common.redact import redact
from job import cifar10
from job.config import Config

PACKAGE = "cifar10-pipeline"
# The checkout the job's code is in, when it runs from one: job/ sits at its top.
CHECKOUT = Path(__file__).resolve().parents[1]
# git answers in milliseconds; a hung one (a network file system) must not hold up the export.
GIT_TIMEOUT_SECONDS = 10


def collect(cfg: Config, data_checksum: str, tensorflow_version: str,
            environ: Mapping[str, str] | None = None, checkout: Path = CHECKOUT) -> Lineage:
    """The lineage of a run of `cfg` on data whose checksum is `data_checksum`, here and now."""
    environ = os.environ if environ is None else environ
    revision, dirty = git_revision(checkout)
    if revision is None:
        revision = environ.get("CIFAR_CODE_REVISION") or None
    data_uri = cfg.data.uri if cfg.data.uri is not None or cfg.data.source != "cifar10" else cifar10.CANONICAL_URL
    return Lineage(
        code_revision=revision, code_dirty=dirty, image=environ.get("CIFAR_IMAGE") or None, job=job(environ),
        data=Data(source=cfg.data.source, uri=None if data_uri is None else redact(data_uri), checksum=data_checksum),
        checkpoint_uri=redact(cfg.checkpoint.uri), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        package_version=_package_version(), tensorflow_version=tensorflow_version,
        python_version=platform.python_version())


def job(environ: Mapping[str, str]) -> Job:
    """The platform's job ids, from the variables it sets in the container (the first platform found).
    An empty variable counts as unset."""
    get = {name: value for name, value in environ.items() if value}.get
    if get("AWS_BATCH_JOB_ID"):
        attempt = get("AWS_BATCH_JOB_ATTEMPT", "")
        return Job(platform="aws-batch", id=get("AWS_BATCH_JOB_ID"),
                   attempt=int(attempt) if attempt.isdigit() else None)
    if get("TRAINING_JOB_NAME") or get("TRAINING_JOB_ARN"):
        return Job(platform="sagemaker", id=get("TRAINING_JOB_ARN"), name=get("TRAINING_JOB_NAME"))
    if get("CLOUD_ML_JOB_ID"):
        return Job(platform="vertex", id=get("CLOUD_ML_JOB_ID"))
    if get("CIFAR_K8S_POD_NAME") or get("CIFAR_K8S_JOB_NAME"):
        return Job(platform="kubernetes", name=get("CIFAR_K8S_JOB_NAME"), pod=get("CIFAR_K8S_POD_NAME"),
                   namespace=get("CIFAR_K8S_NAMESPACE"))
    return Job()


def git_revision(checkout: Path) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether the tree has changes) of the git checkout whose top is `checkout`;
    (None, None) when it is none (an installed package, an image) or git is missing."""
    try:
        top, head = _git(checkout, "rev-parse", "--show-toplevel", "HEAD").splitlines()
        # A package installed somewhere inside another repository (a venv in it) is not that repository's code.
        if Path(top).resolve() != checkout.resolve():
            return None, None
        return head, bool(_git(checkout, "status", "--porcelain").strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True,
                          timeout=GIT_TIMEOUT_SECONDS).stdout


def _package_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
