"""`cifar-job submit aws-batch`: the AWS Batch job definition and submit request for a resolved config.

The job definition holds what does not change between runs (the image, a GPU,
the retry strategy, a timeout); the submit request carries the run's config.
With `--nodes N` (N > 1) it is a multi-node parallel job: N copies of the
container, from whose AWS_BATCH_JOB_* variables the job derives TF_CONFIG
(job/distribute.py) and trains with MultiWorkerMirroredStrategy.
`infra/aws-batch/job-definition.json` and `job-definition-multinode.json` are
`reference_job_definition()` written out (`python -m job.submit` rewrites
them; a test keeps them equal).

Retries follow the exit codes: 75 (SIGTERM after a committed checkpoint) and
4 (storage still failing after the job's own retries) are retried, and so is
the loss of the host (a Spot reclaim: status reason `Host EC2 ... terminated`);
the last rule EXITs on everything else, because AWS Batch retries any failure
no rule matches, config errors (2) and diverged runs (5) included.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from job.config import Config
from job.errors import ConfigError, StorageError

JOB_DEFINITION_NAME = "cifar-job"
MULTINODE_JOB_DEFINITION_NAME = "cifar-job-multinode"
# The image's entrypoint is `cifar-job`, so a container command starts at the subcommand.
COMMAND = ["train"]
INFRA_DIR = Path(__file__).resolve().parents[1] / "infra" / "aws-batch"
INFRA_FILES = {1: INFRA_DIR / "job-definition.json", 2: INFRA_DIR / "job-definition-multinode.json"}
PLACEHOLDER_IMAGE = "<account>.dkr.ecr.<region>.amazonaws.com/cifar10-pipeline-train:latest"
# AWS Batch's rule for job and job definition names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


@dataclass(frozen=True)
class BatchOptions:
    job_queue: str
    image: str
    job_name: str | None = None
    gpus: int = 1
    vcpus: int = 4
    memory: int = 16384  # MiB
    attempts: int = 5
    timeout_hours: float = 24.0
    job_role_arn: str | None = None
    nodes: int = 1

    def check(self) -> None:
        problems = []
        if not self.job_queue:
            problems.append("--job-queue must not be empty")
        if not self.image:
            problems.append("--image must not be empty")
        if self.job_name is not None and not _NAME.match(self.job_name):
            problems.append(f"--job-name {self.job_name!r} must be 1-128 letters, digits, '-' or '_', "
                            "starting with a letter or digit")
        if self.gpus < 0:
            problems.append("--gpus must be 0 or more")
        if self.vcpus < 1:
            problems.append("--vcpus must be at least 1")
        if self.memory < 4:
            problems.append("--memory (MiB) must be at least 4")
        if not 1 <= self.attempts <= 10:
            problems.append("--attempts must be between 1 and 10 (AWS Batch's limit)")
        if not 1 <= self.nodes <= 1000:
            problems.append("--nodes must be between 1 and 1000")
        if self.timeout_hours * 3600 < 60:
            problems.append("--timeout-hours must be at least one minute (AWS Batch's limit)")
        if problems:
            raise ConfigError("; ".join(problems))


def retry_strategy(attempts: int) -> dict:
    return {
        "attempts": attempts,
        # First match wins; at most 5 rules.
        "evaluateOnExit": [
            {"onExitCode": "75", "action": "RETRY"},
            {"onExitCode": "4", "action": "RETRY"},
            {"onStatusReason": "Host EC2*", "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }


def job_definition(opts: BatchOptions) -> dict:
    """The `register_job_definition` request."""
    resources = [{"type": "VCPU", "value": str(opts.vcpus)}, {"type": "MEMORY", "value": str(opts.memory)}]
    if opts.gpus:
        resources.insert(0, {"type": "GPU", "value": str(opts.gpus)})
    container: dict[str, Any] = {"image": opts.image, "command": list(COMMAND), "resourceRequirements": resources,
                                 # The container cannot see its own image; the model card records it (job/lineage.py).
                                 "environment": [{"name": "CIFAR_IMAGE", "value": opts.image}]}
    if opts.job_role_arn:
        # Credentials come from the job role, never from the request.
        container["jobRoleArn"] = opts.job_role_arn
    common = {
        "platformCapabilities": ["EC2"],
        "retryStrategy": retry_strategy(opts.attempts),
        "timeout": {"attemptDurationSeconds": int(round(opts.timeout_hours * 3600))},
    }
    if opts.nodes == 1:
        return {"jobDefinitionName": JOB_DEFINITION_NAME, "type": "container", "containerProperties": container,
                **common}
    # The main node is worker 0, the chief: its exit code is the job's, and
    # it exits 75 when another node is lost, so the whole job is retried.
    nodes = {"numNodes": opts.nodes, "mainNode": 0,
             "nodeRangeProperties": [{"targetNodes": "0:", "container": container}]}
    return {"jobDefinitionName": MULTINODE_JOB_DEFINITION_NAME, "type": "multinode", "nodeProperties": nodes,
            **common}


def config_args(cfg: Config) -> list[str]:
    """`--set KEY=VALUE` for every value of `cfg` that differs from the defaults.

    AWS Batch mounts no config file into the container, and the container's
    environment is not the submitter's, so the resolved config travels in the
    command itself: `--set` ranks above everything else, so the job resolves
    exactly this config (the image must not set `CIFAR_*` variables of its
    own, which would reach the keys left at their defaults). Each value is
    written as YAML, which is how `--set` reads it back (`'2024'` stays a
    string, `1.0e-05` a float); a test checks the round trip.
    """
    # model_construct: the declared defaults, without this machine's CIFAR_* variables.
    defaults = Config.model_construct().model_dump(mode="json")
    args: list[str] = []
    for key, value in _changed_leaves(cfg.model_dump(mode="json"), defaults, ""):
        args += ["--set", f"{key}={_yaml_scalar(value)}"]
    return args


def _changed_leaves(values: dict, defaults: Any, prefix: str):
    if not isinstance(defaults, dict) or values.get("name", None) != defaults.get("name", None):
        # A section with another `name` (a different lr_schedule) is a
        # different shape: every value of it is given.
        defaults = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _changed_leaves(value, defaults.get(key), dotted + ".")
        elif key not in defaults or defaults[key] != value:
            yield dotted, value


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.rstrip("\n").removesuffix("\n...")


def default_job_name(cfg: Config, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    base = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.export.model_name)[: 128 - len(stamp) - 1]
    return f"{base}-{stamp}"


def submit_request(cfg: Config, opts: BatchOptions, job_definition_ref: str) -> dict:
    """The `submit_job` request; `job_definition_ref` is a name, `name:revision` or ARN."""
    request = {"jobName": opts.job_name or default_job_name(cfg), "jobQueue": opts.job_queue,
               "jobDefinition": job_definition_ref}
    overrides = {"command": [*COMMAND, *config_args(cfg)]}
    if opts.nodes == 1:
        request["containerOverrides"] = overrides
    else:
        request["nodeOverrides"] = {"nodePropertyOverrides": [{"targetNodes": "0:", "containerOverrides": overrides}]}
    return request


def dry_run(cfg: Config, opts: BatchOptions) -> dict:
    opts.check()
    jd = job_definition(opts)
    return {"jobDefinition": jd, "submitJob": submit_request(cfg, opts, jd["jobDefinitionName"])}


def warnings(cfg: Config) -> list[str]:
    """What will not survive an AWS Batch attempt: each one starts in a fresh container."""
    out = []
    if not cfg.checkpoint.uri.startswith("s3://"):
        out.append(f"checkpoint.uri is the local path {cfg.checkpoint.uri!r}: a retried attempt starts in a "
                   "fresh container and cannot resume from it; use s3://")
    if not cfg.export.uri.startswith("s3://"):
        out.append(f"export.uri is the local path {cfg.export.uri!r}: the model is lost with the container; "
                   "use s3://")
    return out


def submit(cfg: Config, opts: BatchOptions) -> dict:
    """Register the job definition (a new revision) and submit the job; returns what identifies it."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    opts.check()
    try:
        client = boto3.client("batch")
    except NoRegionError:
        raise ConfigError("no AWS region for AWS Batch: set AWS_REGION or AWS_DEFAULT_REGION, "
                          "or a region in ~/.aws/config") from None
    where = f"AWS Batch ({client.meta.region_name}, {client.meta.endpoint_url})"

    def call(what: str, fn, **request):
        try:
            return fn(**request)
        except NoCredentialsError:
            raise StorageError(f"cannot {what} at {where}: no AWS credentials found "
                               "(environment, ~/.aws or an instance role)") from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            detail = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
            raise StorageError(f"cannot {what} at {where}: {detail}") from None
        except BotoCoreError as exc:
            # botocore's messages name the endpoint, never the credentials.
            raise StorageError(f"cannot {what} at {where}: {exc}") from None

    jd = job_definition(opts)
    registered = call(f"register job definition {jd['jobDefinitionName']}", client.register_job_definition, **jd)
    arn = registered["jobDefinitionArn"]
    request = submit_request(cfg, opts, arn)
    job = call(f"submit job {request['jobName']} to job queue {opts.job_queue}", client.submit_job, **request)
    return {"jobId": job["jobId"], "jobName": job["jobName"], "jobArn": job.get("jobArn"),
            "jobQueue": opts.job_queue, "jobDefinitionArn": arn}


def reference_job_definition(nodes: int = 1) -> dict:
    """The job definitions `infra/aws-batch/` holds: the defaults, a placeholder image."""
    return job_definition(BatchOptions(job_queue="unused", image=PLACEHOLDER_IMAGE, nodes=nodes))


def render_reference(nodes: int = 1) -> str:
    return json.dumps(reference_job_definition(nodes), indent=2) + "\n"


if __name__ == "__main__":
    INFRA_DIR.mkdir(parents=True, exist_ok=True)
    for n, path in INFRA_FILES.items():
        path.write_text(render_reference(n))
        print(f"wrote {path}")
