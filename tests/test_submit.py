"""`cifar-job submit aws-batch`: the job definition and submit request, checked
against boto3's own AWS Batch model, the config carried to the container
intact, and a real submission to a local Batch endpoint (moto's server).

TensorFlow-free and fast: the CLI runs as a subprocess the way a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import botocore.session
import pytest
from botocore.validate import validate_parameters

from helpers import SECRET
from job import submit
from job.config import load_config
from job.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("no_cifar_env")  # no CIFAR_* variable from outside leaks into a test


def env(**extra: str) -> dict[str, str]:
    """The process environment without CIFAR_* or AWS settings, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CIFAR_", "AWS_", "SM_", "AIP_"))}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    # No credentials or region from this machine's files or an instance role.
    out.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    out.update(extra)
    return out


def cli(cwd: Path, *args: str, environ: dict[str, str] | None = None,
        python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "job", *args], cwd=cwd,
                          env=environ or env(), capture_output=True, text=True, timeout=120)


def validate(operation: str, params: dict) -> None:
    """Raises botocore's ParamValidationError on any field AWS Batch's API model does not accept."""
    model = botocore.session.get_session().get_service_model("batch")
    validate_parameters(params, model.operation_model(operation).input_shape)


DRY = ("submit", "aws-batch", "--job-queue", "q", "--image", "img:1", "--dry-run")


# --- the dry run ----------------------------------------------------------------------


def test_dry_run_prints_both_requests_and_sends_nothing(tmp_path):
    # -X importtime lists every module the process imports, on stderr.
    proc = cli(tmp_path, *DRY, "--set", "train.epochs=3", python_flags=("-X", "importtime"),
               # An endpoint that would refuse any request: a dry run makes none.
               environ=env(AWS_ENDPOINT_URL_BATCH="http://127.0.0.1:9"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "job" in imported
    assert "tensorflow" not in imported and "keras" not in imported and "boto3" not in imported
    out = json.loads(proc.stdout)
    assert set(out) == {"jobDefinition", "submitJob"}
    jd, sj = out["jobDefinition"], out["submitJob"]

    assert sj["jobQueue"] == "q"
    assert jd["containerProperties"]["image"] == "img:1"
    # The container learns its image from its environment, for the model card's lineage.
    assert {"name": "CIFAR_IMAGE", "value": "img:1"} in jd["containerProperties"]["environment"]
    assert {"type": "GPU", "value": "1"} in jd["containerProperties"]["resourceRequirements"]
    rules = jd["retryStrategy"]["evaluateOnExit"]
    assert jd["retryStrategy"]["attempts"] == 5
    assert {"onExitCode": "75", "action": "RETRY"} in rules
    assert {"onStatusReason": "Host EC2*", "action": "RETRY"} in rules
    # Without a final catch-all EXIT, Batch retries every failure, config errors included.
    assert rules[-1] == {"onReason": "*", "action": "EXIT"}
    assert len(rules) <= 5  # AWS Batch's limit
    assert jd["timeout"]["attemptDurationSeconds"] == 24 * 3600
    assert jd["platformCapabilities"] == ["EC2"]
    assert sj["jobDefinition"] == jd["jobDefinitionName"]
    assert sj["containerOverrides"]["command"] == ["train", "--set", "train.epochs=3"]
    assert sj["jobName"].startswith("cifar10-")

    validate("RegisterJobDefinition", jd)
    validate("SubmitJob", sj)


def test_dry_run_warns_on_stderr_about_local_paths_only(tmp_path):
    proc = cli(tmp_path, *DRY)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.uri" in proc.stderr and "export.uri" in proc.stderr
    json.loads(proc.stdout)  # the warnings stay out of the JSON
    proc = cli(tmp_path, *DRY, "--set", "checkpoint.uri=s3://bkt/ckpt", "--set", "export.uri=s3://bkt/export")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_options_reach_the_requests(tmp_path):
    (tmp_path / "job.yaml").write_text("train:\n  batch_size: 128\nexport:\n  model_name: resnet.v2\n")
    proc = cli(tmp_path, *DRY, "--config", "job.yaml", "--job-name", "nightly_1", "--gpus", "4", "--vcpus", "32",
               "--memory", "120000", "--attempts", "3", "--timeout-hours", "1.5",
               "--job-role-arn", "arn:aws:iam::123456789012:role/cifar-job")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    container = out["jobDefinition"]["containerProperties"]
    assert container["resourceRequirements"] == [
        {"type": "GPU", "value": "4"}, {"type": "VCPU", "value": "32"}, {"type": "MEMORY", "value": "120000"}]
    assert container["jobRoleArn"] == "arn:aws:iam::123456789012:role/cifar-job"
    assert out["jobDefinition"]["retryStrategy"]["attempts"] == 3
    assert out["jobDefinition"]["timeout"] == {"attemptDurationSeconds": 5400}
    assert out["submitJob"]["jobName"] == "nightly_1"
    assert out["submitJob"]["containerOverrides"]["command"] == [
        "train", "--set", "train.batch_size=128", "--set", "export.model_name=resnet.v2"]
    validate("RegisterJobDefinition", out["jobDefinition"])
    validate("SubmitJob", out["submitJob"])


def test_cpu_only_has_no_gpu_requirement():
    jd = submit.job_definition(submit.BatchOptions(job_queue="q", image="i", gpus=0))
    assert [r["type"] for r in jd["containerProperties"]["resourceRequirements"]] == ["VCPU", "MEMORY"]
    validate("RegisterJobDefinition", jd)


def test_default_job_name_is_a_valid_batch_name():
    cfg = load_config(None, ["export.model_name=my.model"])
    name = submit.default_job_name(cfg, now=0)
    assert name == "my-model-19700101-000000"
    validate("SubmitJob", {"jobName": name, "jobQueue": "q", "jobDefinition": "d"})


@pytest.mark.parametrize("args, needle", [
    (("--attempts", "11"), "--attempts"),
    (("--attempts", "0"), "--attempts"),
    (("--nodes", "0"), "--nodes"),
    (("--job-name", "-bad name"), "--job-name"),
    (("--timeout-hours", "0"), "--timeout-hours"),
    (("--vcpus", "0"), "--vcpus"),
    (("--gpus", "-1"), "--gpus"),
    (("--set", "train.epochs=0"), "train.epochs"),
])
def test_invalid_options_and_config_exit_2(tmp_path, args, needle):
    proc = cli(tmp_path, *DRY, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args", [
    ("submit",),  # no target
    ("submit", "aws-batch", "--image", "i"),  # --job-queue is required
    ("submit", "aws-batch", "--job-queue", "q"),  # --image is required
    ("submit", "gcp", "--job-queue", "q", "--image", "i"),
])
def test_usage_errors_exit_2(tmp_path, args):
    proc = cli(tmp_path, *args)
    assert proc.returncode == 2 and "usage:" in proc.stderr, (proc.stdout, proc.stderr)


# --- the config travels intact -----------------------------------------------------


CONFIGS = [
    [],
    ["train.epochs=3"],
    # Strings YAML would read as something else, floats in exponent form, None, nested sections.
    ["export.model_name=2024", "train.learning_rate=1e-5", "data.source=cifar10", "data.uri='s3://bkt/a: b #c'",
     "train.max_steps=7", "data.synthetic.train_size=5000", "data.augment=true", "seed=4294967295"],
    # A schedule other than the default, with parameters, and one parameter at its default.
    ["train.lr_schedule.name=one_cycle", "train.lr_schedule.peak_at=0.3", "train.early_stopping.enabled=true",
     "train.early_stopping.patience=5", "checkpoint.resume=never", "export.model_name='true'"],
    ["train.lr_schedule=cosine", "data.cache_dir=~/x y/'q'", "export.uri=/tmp/ünï code", "train.optimizer=sgd",
     "train.jit_compile=true", "train.deterministic=false", "checkpoint.retry_seconds=0.25"],
]


@pytest.mark.parametrize("sets", CONFIGS)
def test_the_command_reproduces_the_resolved_config(sets):
    cfg = load_config(None, sets)
    command = submit.submit_request(cfg, submit.BatchOptions(job_queue="q", image="i"), "d")[
        "containerOverrides"]["command"]
    assert command[0] == "train"
    flags, values = command[1::2], command[2::2]
    assert set(flags) <= {"--set"} and len(flags) == len(values)
    # What the job in the container resolves from that command.
    assert load_config(None, values).model_dump() == cfg.model_dump()


def test_file_and_environment_are_folded_into_the_command(tmp_path, monkeypatch):
    (tmp_path / "job.yaml").write_text(
        "seed: 9\ntrain:\n  epochs: 4\n  lr_schedule: {name: cosine, warmup_epochs: 1}\n")
    monkeypatch.setenv("CIFAR_TRAIN__BATCH_SIZE", "256")
    cfg = load_config(tmp_path / "job.yaml", ["train.epochs=6"])
    values = submit.config_args(cfg)[1::2]
    monkeypatch.delenv("CIFAR_TRAIN__BATCH_SIZE")
    assert load_config(None, values).model_dump() == cfg.model_dump()
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 6 and cfg.seed == 9


def test_the_container_environment_cannot_change_the_carried_config(monkeypatch):
    cfg = load_config(None, ["train.epochs=3"])
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "50")
    assert load_config(None, submit.config_args(cfg)[1::2]).train.epochs == 3


def test_dry_run_leaves_this_machines_platform_out(tmp_path):
    # Submitting from a SageMaker notebook or a Vertex job must not bake its paths into the Batch job.
    proc = cli(tmp_path, *DRY, environ=env(SM_MODEL_DIR="/opt/ml/model", AIP_CHECKPOINT_DIR="gs://b/c"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["submitJob"]["containerOverrides"]["command"] == ["train"]


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="--memory"):
        submit.BatchOptions(job_queue="q", image="i", memory=0).check()


# --- infra/aws-batch/job-definition.json ----------------------------------------------


@pytest.mark.parametrize("nodes", [1, 2])
def test_infra_job_definitions_are_what_the_code_generates(nodes):
    path = submit.INFRA_FILES[nodes]
    text = path.read_text()
    assert json.loads(text) == submit.reference_job_definition(nodes), (
        f"{path} is stale: rewrite it with `python -m job.submit`")
    assert text == submit.render_reference(nodes)
    validate("RegisterJobDefinition", json.loads(text))


def test_multinode_job_runs_the_same_container_on_every_node(tmp_path):
    proc = cli(tmp_path, *DRY, "--nodes", "4", "--gpus", "8", "--set", "train.batch_size=512")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    jd, sj = out["jobDefinition"], out["submitJob"]
    assert jd["type"] == "multinode" and "containerProperties" not in jd
    nodes = jd["nodeProperties"]
    assert nodes["numNodes"] == 4 and nodes["mainNode"] == 0
    [everyone] = nodes["nodeRangeProperties"]
    assert everyone["targetNodes"] == "0:"
    assert {"type": "GPU", "value": "8"} in everyone["container"]["resourceRequirements"]
    assert {"name": "CIFAR_IMAGE", "value": "img:1"} in everyone["container"]["environment"]
    assert {"onExitCode": "75", "action": "RETRY"} in jd["retryStrategy"]["evaluateOnExit"]
    assert "containerOverrides" not in sj
    assert sj["nodeOverrides"] == {"nodePropertyOverrides": [
        {"targetNodes": "0:", "containerOverrides": {"command": ["train", "--set", "train.batch_size=512"]}}]}
    validate("RegisterJobDefinition", jd)
    validate("SubmitJob", sj)


# --- a real submission, to a local AWS Batch endpoint -------------------------------


@pytest.fixture
def batch(s3_server):
    """moto's server as AWS Batch: a compute environment and a job queue; jobs are not run (no Docker)."""
    import uuid

    import boto3
    import requests

    requests.post(f"{s3_server}/moto-api/config", json={"batch": {"use_docker": False}}, timeout=10).raise_for_status()
    aws = dict(endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing-key",
               aws_secret_access_key=SECRET)
    suffix = uuid.uuid4().hex[:8]
    role = boto3.client("iam", **aws).create_role(
        RoleName=f"batch-{suffix}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    client = boto3.client("batch", **aws)
    env_arn = client.create_compute_environment(
        computeEnvironmentName=f"ce-{suffix}", type="UNMANAGED", state="ENABLED", serviceRole=role,
    )["computeEnvironmentArn"]
    queue = client.create_job_queue(
        jobQueueName=f"q-{suffix}", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env_arn}],
    )["jobQueueName"]
    process_env = env(AWS_ENDPOINT_URL_BATCH=s3_server, AWS_ACCESS_KEY_ID="testing-key",
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    return client, queue, process_env


def test_submit_registers_the_definition_and_submits_the_job(tmp_path, batch):
    client, queue, process_env = batch
    proc = cli(tmp_path, "submit", "aws-batch", "--job-queue", queue, "--image", "img:1", "--job-name", "run-1",
               "--set", "train.epochs=3", "--set", "checkpoint.uri=s3://bkt/c", "--set", "export.uri=s3://bkt/e",
               environ=process_env)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["jobName"] == "run-1" and out["jobQueue"] == queue

    (job,) = client.describe_jobs(jobs=[out["jobId"]])["jobs"]
    assert job["jobName"] == "run-1"
    assert job["jobDefinition"] == out["jobDefinitionArn"]
    (definition,) = client.describe_job_definitions(jobDefinitions=[out["jobDefinitionArn"]])["jobDefinitions"]
    assert definition["containerProperties"]["image"] == "img:1"
    assert {"name": "CIFAR_IMAGE", "value": "img:1"} in definition["containerProperties"]["environment"]
    last = definition["retryStrategy"]["evaluateOnExit"][-1]
    # moto answers the action in lower case; AWS Batch takes it in either.
    assert (last["onReason"], last["action"].upper()) == ("*", "EXIT")
    assert {"type": "GPU", "value": "1"} in definition["containerProperties"]["resourceRequirements"]
    assert job["container"]["command"] == [
        "train", "--set", "train.epochs=3", "--set", "checkpoint.uri=s3://bkt/c", "--set", "export.uri=s3://bkt/e"]


def test_submit_to_a_missing_queue_exits_4_naming_it(tmp_path, batch):
    _, _, process_env = batch
    proc = cli(tmp_path, "submit", "aws-batch", "--job-queue", "no-such-queue", "--image", "img:1",
               environ=process_env)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "no-such-queue" in proc.stderr and "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr and proc.stdout == ""


def test_submit_unreachable_endpoint_exits_4_without_secrets(tmp_path):
    proc = cli(tmp_path, "submit", "aws-batch", "--job-queue", "q", "--image", "img:1",
               environ=env(AWS_ENDPOINT_URL_BATCH="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="testing-key",
                           AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="eu-west-1", AWS_MAX_ATTEMPTS="1"))
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "http://127.0.0.1:9" in proc.stderr and "eu-west-1" in proc.stderr
    assert SECRET not in proc.stderr and "Traceback" not in proc.stderr


def test_submit_without_credentials_exits_4(tmp_path):
    proc = cli(tmp_path, "submit", "aws-batch", "--job-queue", "q", "--image", "img:1",
               environ=env(AWS_ENDPOINT_URL_BATCH="http://127.0.0.1:9", AWS_DEFAULT_REGION="eu-west-1"))
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "no AWS credentials" in proc.stderr and "Traceback" not in proc.stderr


def test_submit_without_a_region_exits_2(tmp_path):
    proc = cli(tmp_path, "submit", "aws-batch", "--job-queue", "q", "--image", "img:1",
               environ=env(AWS_ACCESS_KEY_ID="testing-key", AWS_SECRET_ACCESS_KEY=SECRET))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "region" in proc.stderr and "Traceback" not in proc.stderr
