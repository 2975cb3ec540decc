"""The Dockerfiles and compose file, checked statically (no Docker engine
here): linted, parsed, and their commands checked against the code."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).with_name("hadolint")


COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.console.yml",
                 "docker-compose.multiworker.yml", "tests/compose/docker-compose.test.yml"]


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], *([COMPOSE_FILES[0], f] for f in COMPOSE_FILES[1:])],
                         ids=lambda files: files[-1])
def test_compose_v2_resolves_the_file_alone_and_with_each_override(files):
    services = compose_config(*files)["services"]
    # Every service any of the files names, merged into one project.
    assert set(services) == {name for f in files for name in yaml.safe_load((ROOT / f).read_text())["services"]}


def defaults(value):
    """Each `${VAR:-default}` as its default and `$$` as `$`, as compose interpolates with nothing set."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: defaults(v) for k, v in value.items()}
    if isinstance(value, list):
        return [defaults(v) for v in value]
    return value


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_compose_files_follow_the_compose_specification(path):
    """Compose v2 reads the Compose Specification; where v2 is not installed the files still go (anchors
    merged, variables at their defaults, as v2 does before it validates) through compose_spec, another
    parser of that specification, which refuses what it does not define."""
    from compose_spec import PyCompose

    text = yaml.safe_dump(defaults(yaml.safe_load((ROOT / path).read_text())))
    assert set(PyCompose.from_yaml(text).service_names()) == set(yaml.safe_load(text)["services"])
    broken = text.replace("service_completed_successfully", "service_completed", 1)
    if broken != text:
        with pytest.raises(ValueError, match="service_completed"):
            PyCompose.from_yaml(broken)


def test_compose_topology():
    services = compose_config()["services"]
    assert {"minio", "train", "tfserving", "serve"} <= set(services)
    assert "healthcheck" in services["minio"]
    assert services["train"]["depends_on"]["minio"]["condition"] == "service_healthy"
    # The model card's image (job/lineage.py) is the one the job runs in.
    assert services["train"]["environment"]["CIFAR_IMAGE"] == services["train"]["image"]
    assert [name for name, s in services.items() if s.get("ports")] == ["serve"]
    assert services["serve"]["environment"]["SERVE_BACKEND"] == "tfserving"
    assert "curl" not in json.dumps(services["tfserving"]["healthcheck"])  # the official image has none


def test_compose_gives_the_service_time_to_drain_before_it_is_killed():
    from serve.settings import Settings

    serve = compose_config()["services"]["serve"]
    seconds = serve["stop_grace_period"]
    assert seconds.endswith("s")
    assert float(seconds[:-1]) > Settings().drain_seconds + Settings().graceful_timeout


def test_compose_commands_match_the_code(tmp_path):
    services = compose_config()["services"]
    # The training command resolves the shipped config (check-config runs the same parser and validation).
    train = services["train"]["command"]
    assert train[0] == "train"
    env = {**services["train"]["environment"]}
    done = subprocess.run([sys.executable, "-m", "job", "check-config", *train[1:]], cwd=ROOT, capture_output=True,
                          text=True, env={**env, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["checkpoint"]["uri"].startswith("s3://cifar/") and resolved["export"]["uri"].startswith("s3://")
    # The sync sidecar fills the folder TF Serving's model config names, for the model the job exports.
    sync = services["model-sync"]["command"]
    source, dest = sync[sync.index("--from") + 1], sync[sync.index("--to") + 1]
    assert source == f"{resolved['export']['uri']}/{resolved['export']['model_name']}"
    models_config = (ROOT / "infra" / "tfserving" / "models.config").read_text()
    assert f'base_path: "{dest}"' in models_config and f'name: "{resolved["export"]["model_name"]}"' in models_config
    assert services["serve"]["environment"]["SERVE_MODEL_NAME"] == resolved["export"]["model_name"]
    help_text = subprocess.run([sys.executable, "-m", "serve", "sync", "--help"], capture_output=True, text=True)
    assert "--from" in help_text.stdout and "--to" in help_text.stdout and "--every" in help_text.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile.train", "Dockerfile.serve"])
def test_dockerfiles_lint_clean_and_end_as_a_non_root_user(dockerfile):
    done = subprocess.run([str(HADOLINT), dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"(AWS_SECRET|PASSWORD|TOKEN)\w*\s*=", text)


def test_serve_image_ships_no_training_code_and_checks_its_health():
    text = (ROOT / "Dockerfile.serve").read_text()
    assert "COPY job" not in text and "HEALTHCHECK" in text and "/healthz" in text and "EXPOSE 8080" in text
    assert 'pip install ".[serve-libs]"' in text  # the service's extra, not training's (matplotlib, tensorboard)


def test_serve_image_installs_the_cpu_build_of_the_tensorflow_the_project_pins():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {re.split(r"[=<>]", req)[0]: req for req in extras["tf"]}
    text = (ROOT / "Dockerfile.serve").read_text()
    assert f'"tensorflow-cpu{pins["tensorflow"].removeprefix("tensorflow")}"' in text
    assert f'--no-deps "{pins["tensorflow-serving-api"]}"' in text
    assert "tensorflow[and-cuda]" not in text and "cuda" not in extras["serve"][0]


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "tests"} <= set(ignored)
