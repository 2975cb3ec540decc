"""The Kubernetes manifests, parsed and checked against the code they run and
against the API schemas of the clusters that run them."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job.errors import ConfigError, DataError, DivergedError, Preempted

ROOT = Path(__file__).resolve().parents[1]


def docs(name):
    return list(yaml.safe_load_all((ROOT / "infra" / "k8s" / name).read_text()))


# The oldest minor version the big managed services (EKS, GKE, AKS) still support, and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
# Kubeflow training operator v1.9.0's TFJob CRD, vendored (tests/data/README.md says from where).
TFJOB_CRD = ROOT / "tests" / "data" / "kubeflow-training-operator" / "kubeflow.org_tfjobs.yaml"


def closed(schema):
    """A CRD's schema as the API server reads it under strict field validation: an object takes no field
    its schema does not name, unless the schema says it keeps unknown fields."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def tfjob_validator() -> jsonschema.Draft4Validator:
    crd = yaml.load(TFJOB_CRD.read_text(), Loader=yaml.CSafeLoader)
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    # A CRD's schema is OpenAPI 3.0's, whose keywords are JSON Schema draft 4's.
    return jsonschema.Draft4Validator(closed(v1["schema"]["openAPIV3Schema"]))


def validate(resource: dict, kubernetes_version: str) -> None:
    """Raises unless the cluster (the training operator's CRD, for a TFJob) would take the resource as it is."""
    if (resource["apiVersion"], resource["kind"]) == ("kubeflow.org/v1", "TFJob"):
        tfjob_validator().validate(resource)
    else:
        kubernetes_validate.validate(resource, kubernetes_version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", sorted((ROOT / "infra" / "k8s").glob("*.yaml")), ids=lambda path: path.name)
def test_every_manifest_is_what_the_oldest_and_newest_supported_clusters_accept(path, version):
    for resource in docs(path.name):
        validate(resource, version)


@pytest.mark.parametrize("where, field", [(("spec", "tfReplicaSpecs", "Worker"), "replica"),
                                          (("spec", "tfReplicaSpecs", "Worker", "template", "spec"), "container")])
def test_a_tfjob_field_the_operator_does_not_define_is_refused(where, field):
    (tfjob,) = docs("train-tfjob.yaml")
    functools.reduce(dict.get, where, tfjob)[field] = 2  # a misspelt `replicas`, `containers`
    with pytest.raises(jsonschema.ValidationError, match=f"'{field}' was unexpected"):
        validate(tfjob, KUBERNETES_VERSIONS[0])


def assert_a_valid_train_command(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "job", "check-config", *args[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    assert args[0] == "train" and done.returncode == 0, done.stderr


def test_training_job_retries_disruptions_and_fails_fast_on_bad_config():
    (job,) = docs("train-job.yaml")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    by_action = {r["action"]: r["onExitCodes"]["values"] for r in rules if "onExitCodes" in r}
    assert by_action["Ignore"] == [Preempted.exit_code]
    assert set(by_action["FailJob"]) == {ConfigError.exit_code, DataError.exit_code, DivergedError.exit_code}
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    # The container's args are a valid command line of the job.
    assert_a_valid_train_command(container["args"])
    from job.config import Checkpoint

    assert pod["terminationGracePeriodSeconds"] > Checkpoint().grace_seconds


def test_service_probes_are_routes_the_service_has(make_app):
    from serve.settings import Settings

    deployment, service = docs("serve.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    app = make_app(Settings(backend="tfserving", tfserving_address="127.0.0.1:9", poll_seconds=60))
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in rules
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in rules
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SERVE_TFSERVING_ADDRESS"] == "tfserving:8500"
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_tfserving_sidecar_fills_the_folder_tfserving_reads():
    deployment, service = docs("tfserving.yaml")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    sync = containers["model-sync"]["args"]
    assert containers["model-sync"]["command"] == ["cifar-serve", "sync"]
    models_config = (ROOT / "infra" / "tfserving" / "models.config").read_text()
    assert f'base_path: "{sync[sync.index("--to") + 1]}"' in models_config
    assert service["spec"]["ports"][0]["port"] == 8500


def test_tfjob_restarts_workers_and_every_worker_reads_the_operators_tf_config():
    from job import distribute
    from job.config import load_config

    (tfjob,) = docs("train-tfjob.yaml")
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    # ExitCode would treat 75 (a lost peer, a committed SIGTERM) as permanent.
    assert worker["restartPolicy"] == "OnFailure" and tfjob["spec"]["runPolicy"]["backoffLimit"] <= 10
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow" and pod["securityContext"]["runAsNonRoot"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CIFAR_CHECKPOINT__URI"].startswith("s3://"), "every worker must reach the chief's checkpoints"
    assert_a_valid_train_command(container["args"])
    cfg = load_config(str(ROOT / container["args"][2]), [])
    assert cfg.train.batch_size % worker["replicas"] == 0
    # TF_CONFIG as the training operator writes it, for the second worker.
    hosts = [f"cifar10-train-multiworker-worker-{i}.default.svc:2222" for i in range(worker["replicas"])]
    operator = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 1}, "environment": "cloud"}
    assert distribute._tf_config({"TF_CONFIG": json.dumps(operator)}) == {
        "cluster": {"worker": hosts}, "task": {"type": "worker", "index": 1}}
    assert container["ports"][0]["containerPort"] == 2222


def containers_in(node):
    """Every container (init containers too) anywhere in a parsed manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                yield from value
            else:
                yield from containers_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers_in(item)


def refers_to_s3(command: list, env) -> bool:
    """Whether a command line, its environment or a config file it names (`--config F`) holds an s3:// URI."""
    words = [word for part in command for word in str(part).split()]
    configs = [(ROOT / words[i + 1]).read_text() for i, word in enumerate(words[:-1]) if word == "--config"]
    return "s3://" in json.dumps([command, env, configs])


def test_every_k8s_container_that_reads_s3_reaches_it_as_the_training_job_does():
    (job,) = docs("train-job.yaml")
    (train,) = job["spec"]["template"]["spec"]["containers"]

    def s3_env(container):
        return sorted(json.dumps(e, sort_keys=True) for e in container.get("env", []) if e["name"].startswith("AWS_"))

    expected = s3_env(train)
    assert {json.loads(e)["name"] for e in expected} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(json.loads(e)["valueFrom"]["secretKeyRef"]["name"] == "cifar-s3" for e in expected)
    checked = set()
    for path in sorted((ROOT / "infra" / "k8s").glob("*.yaml")):
        for container in containers_in(docs(path.name)):
            if refers_to_s3([*container.get("command", []), *container.get("args", [])], container.get("env")):
                # One Secret (and endpoint, if one is ever set) for all: a container reaching S3
                # otherwise than the Job that writes there would never see what it wrote.
                assert s3_env(container) == expected, (path.name, container["name"])
                checked.add(container["name"])
    assert {"train", "dataset", "tensorflow", "model-sync"} <= checked


def test_every_compose_service_that_reads_s3_reaches_minio():
    from urllib.parse import urlparse

    from helpers import compose_config

    services = compose_config()["services"]
    minio = services["minio"]["environment"]
    checked = set()
    for name, service in services.items():
        env = service.get("environment") or {}
        if refers_to_s3([*(service.get("entrypoint") or []), *(service.get("command") or [])], env):
            assert urlparse(env.get("AWS_ENDPOINT_URL_S3", "")).hostname in services, name
            assert env.get("AWS_ACCESS_KEY_ID") == minio["MINIO_ROOT_USER"], name
            assert env.get("AWS_SECRET_ACCESS_KEY") == minio["MINIO_ROOT_PASSWORD"], name
            checked.add(name)
    assert {"dataset", "train", "model-sync"} <= checked


def test_a_serve_pod_is_given_time_to_drain_before_it_is_killed():
    from serve.settings import Settings

    (deployment, _) = docs("serve.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings(drain_seconds=env["SERVE_DRAIN_SECONDS"], graceful_timeout=env["SERVE_GRACEFUL_TIMEOUT"])
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and settings.drain_seconds > 0
    # Kubernetes counts the grace period from the preStop hook's start.
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + settings.drain_seconds + settings.graceful_timeout


def test_every_training_container_tells_the_model_card_its_image_job_and_pod():
    from job import lineage

    (job,) = docs("train-job.yaml")
    (tfjob,) = docs("train-tfjob.yaml")
    (train,) = job["spec"]["template"]["spec"]["containers"]
    (worker,) = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    # The label each controller puts on its pods: the Job controller's, and Kubeflow's training operator's.
    for container, label in ((train, "job-name"), (worker, "training.kubeflow.org/job-name")):
        env = {e["name"]: e for e in container["env"]}
        assert env["CIFAR_IMAGE"]["value"] == container["image"], container["name"]
        fields = {name: env[name]["valueFrom"]["fieldRef"]["fieldPath"]
                  for name in ("CIFAR_K8S_JOB_NAME", "CIFAR_K8S_POD_NAME", "CIFAR_K8S_NAMESPACE")}
        assert fields == {"CIFAR_K8S_JOB_NAME": f"metadata.labels['{label}']", "CIFAR_K8S_POD_NAME": "metadata.name",
                          "CIFAR_K8S_NAMESPACE": "metadata.namespace"}
        # What the job makes of the values the kubelet fills in.
        pod = {"CIFAR_K8S_JOB_NAME": "cifar10-train", "CIFAR_K8S_POD_NAME": "cifar10-train-x7k2p",
               "CIFAR_K8S_NAMESPACE": "default"}
        assert lineage.job(pod).model_dump() == {"platform": "kubernetes", "id": None, "attempt": None,
                                                 "name": "cifar10-train", "pod": "cifar10-train-x7k2p",
                                                 "namespace": "default"}
