"""The model card's `lineage`: where a version came from. The job writes it
(job/lineage.py collects it), the service shows it (`.../card`), and MLflow
tracking tags a run with its fields flattened, so it holds plain JSON values
only, nested one level at most.

Every field may be None: a run outside a git checkout and without an image's
baked revision has no `code_revision`, a run started by hand has no `job`.
Locations are redacted (common/redact.py) before they are recorded.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Job(BaseModel):
    """The platform that ran the job and the ids it gave it, where it gave them."""

    platform: str | None = Field(None, description="aws-batch, sagemaker, vertex or kubernetes; None when run by "
                                                   "hand or where none of their variables is set")
    id: str | None = Field(None, description="AWS Batch's job id, SageMaker's job ARN or Vertex AI's job id")
    attempt: int | None = Field(None, description="AWS Batch's attempt number")
    name: str | None = Field(None, description="SageMaker's training job name, or the Kubernetes Job's (or TFJob's)")
    pod: str | None = Field(None, description="the Kubernetes pod's name")
    namespace: str | None = Field(None, description="the Kubernetes pod's namespace")


class Data(BaseModel):
    source: str = Field(description="data.source: synthetic, cifar10 or folder")
    uri: str | None = Field(None, description="where the data was read from, secrets redacted; None for synthetic")
    checksum: str = Field(description="sha256 of the arrays trained and tested on, as the resume check records it")


class Lineage(BaseModel):
    code_revision: str | None = Field(None, description="the git commit: of the checkout the job ran from, "
                                                        "else the one baked into the image (CIFAR_CODE_REVISION)")
    code_dirty: bool | None = Field(None, description="whether the checkout had uncommitted changes; None when "
                                                      "the revision is not from a checkout")
    image: str | None = Field(None, description="the image the job ran in (CIFAR_IMAGE)")
    job: Job = Job()
    data: Data
    checkpoint_uri: str = Field(description="checkpoint.uri, secrets redacted")
    created: str = Field(description="when the card was written: UTC, ISO 8601")
    package_version: str | None = Field(None, description="cifar10-pipeline's version")
    tensorflow_version: str
    python_version: str
