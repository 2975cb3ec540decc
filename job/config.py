"""The job's configuration: one pydantic model, read from a YAML file, the
environment (`CIFAR_TRAIN__EPOCHS=3`) and `--set train.epochs=3`, in rising
precedence. Unknown keys are errors everywhere, so a typo never silently
trains with a default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from job.errors import ConfigError
from job.platform import hyperparameters, platform_overrides


class Section(BaseModel):
    # `--set export.model_name=2024` reaches here as YAML's int 2024; the
    # environment gives the string "2024". Both mean the same name.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class SyntheticData(Section):
    train_size: int = Field(10_000, ge=1)
    test_size: int = Field(2_000, ge=1)


class Data(Section):
    source: Literal["synthetic", "cifar10", "folder"] = "synthetic"
    # None means the canonical CIFAR-10 binary archive (checksum verified).
    uri: str | None = None
    cache_dir: str = "~/.cache/cifar10-pipeline"
    synthetic: SyntheticData = SyntheticData()
    validation_size: int = Field(1_000, ge=0)
    augment: bool = False
    # With augment: random translation by up to this many pixels (reflect
    # padding, then a 32x32 crop), and a horizontal flip.
    translate: int = Field(4, ge=0, le=16)


class Model(Section):
    name: Literal["simple_cnn", "resnet", "airbench"] = "simple_cnn"
    # Multiplies every layer's channel count: 0.5 is a network four times cheaper.
    width: float = Field(1.0, gt=0, le=8)
    # Another run's checkpoint.uri (its latest checkpoint) or one of its
    # `.../ckpt-<step>` directories: a new run starts from its weights.
    init_from: str | None = None


class Constant(Section):
    name: Literal["constant"] = "constant"


class Exponential(Section):
    name: Literal["exponential"]
    decay_rate: float = Field(0.96, gt=0, le=1)
    decay_epochs: float = Field(1.0, gt=0)


class Cosine(Section):
    name: Literal["cosine"]
    warmup_epochs: float = Field(0.0, ge=0)
    final_fraction: float = Field(0.0, ge=0, le=1)


class OneCycle(Section):
    name: Literal["one_cycle"]
    # Fraction of the run spent rising to the peak learning rate.
    peak_at: float = Field(0.25, gt=0, lt=1)
    start_fraction: float = Field(0.1, gt=0, le=1)
    final_fraction: float = Field(0.0, ge=0, le=1)


class ReduceOnPlateau(Section):
    name: Literal["reduce_on_plateau"]
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(2, ge=0)
    min_lr: float = Field(0.0, ge=0)


_SCHEDULES = (Constant, Exponential, Cosine, OneCycle, ReduceOnPlateau)
Schedule = Annotated[Union[_SCHEDULES], Field(discriminator="name")]  # noqa: UP007
_SCHEDULE_NAMES = {get_args(s.model_fields["name"].annotation)[0] for s in _SCHEDULES}
# Schedules whose curve spans `train.epochs`: for them the epochs are fixed
# when a run starts (they are in its fingerprint), as a resume under another
# value would bend the curve mid-run. The others take epochs as a stop only.
HORIZON_SCHEDULES = ("cosine", "one_cycle")


class EarlyStopping(Section):
    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True


class Train(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    max_steps: int | None = Field(None, ge=1)
    # Steps per compiled call. Results do not depend on it (the same ops run
    # in the same order); fewer Python round trips make each step cheaper.
    steps_per_loop: int = Field(10, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(0.001, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Schedule = Constant()
    early_stopping: EarlyStopping = EarlyStopping()
    mixed_precision: bool = False
    jit_compile: bool = False
    deterministic: bool = True
    log_every_steps: int = Field(50, ge=1)

    @field_validator("lr_schedule", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        # `lr_schedule: cosine` is shorthand for `lr_schedule: {name: cosine}`.
        return {"name": value} if isinstance(value, str) else value


class Checkpoint(Section):
    uri: str = "runs/default/checkpoints"
    every_steps: int = Field(500, ge=1)
    # Also commit once this much wall-clock time has passed since the last
    # commit (spot capacity), looked at between compiled calls.
    every_seconds: float | None = Field(None, gt=0)
    keep: int = Field(3, ge=1)
    resume: Literal["auto", "never", "required"] = "auto"
    # A step kept in this checkpoint.uri, or another run's checkpoint.uri or
    # `.../ckpt-<step>` directory: the run restarts from that state.
    resume_from: int | str | None = None
    # How long a background commit keeps retrying through a storage outage
    # before the job gives up with exit 4.
    retry_seconds: float = Field(300.0, gt=0)
    # SIGTERM to exit: the time the current checkpoint gets to commit.
    grace_seconds: float = Field(30.0, gt=0)
    # A run that dies holding the lease blocks a successor for at most this long.
    lease_seconds: float = Field(60.0, ge=1)

    @field_validator("resume_from", mode="before")
    @classmethod
    def _step_as_int(cls, value: Any) -> Any:
        # The environment gives every value as a string; `40` is a step wherever it comes from.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class Export(Section):
    uri: str = "runs/default/export"
    model_name: str = Field("cifar10", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # best: the checkpoint with the best validation result (train.early_stopping.monitor).
    weights: Literal["last", "best"] = "last"


class Distribute(Section):
    # auto: from the environment (TF_CONFIG, AWS Batch multi-node, local GPUs).
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    # Splits the host's CPU into this many logical devices, each a replica:
    # rehearses mirrored training on a machine without GPUs.
    cpu_devices: int = Field(1, ge=1, le=64)
    # AWS Batch multi-node jobs: the nodes meet at the main node's `port` to
    # learn each other's addresses; node i's TensorFlow server uses port + 1 + i.
    port: int = Field(2222, ge=1024, le=65000)
    # How long workers wait for each other at start before the job fails (exit 75).
    startup_timeout_seconds: float = Field(300.0, gt=0)


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix="CIFAR_", env_nested_delimiter="__"
    )

    seed: int = 0
    data: Data = Data()
    model: Model = Model()
    train: Train = Train()
    checkpoint: Checkpoint = Checkpoint()
    export: Export = Export()
    distribute: Distribute = Distribute()

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        needs_val = [
            name
            for name, on in [
                ("train.early_stopping", self.train.early_stopping.enabled),
                ("train.lr_schedule (reduce_on_plateau)", self.train.lr_schedule.name == "reduce_on_plateau"),
                ("export.weights (best)", self.export.weights == "best"),
            ]
            if on
        ]
        if self.train.jit_compile and self.train.deterministic:
            # Found when op determinism met XLA: "MaxPool gradient ops do not
            # yet have a deterministic XLA implementation". Failing here costs
            # no GPU time; failing at the first step would.
            raise ValueError("train.jit_compile needs train.deterministic=false: XLA has no deterministic "
                             "kernels for some of the gradients these models use")
        if self.checkpoint.resume_from is not None and self.model.init_from is not None:
            raise ValueError("checkpoint.resume_from and model.init_from exclude each other: resume_from restores "
                             "a run's whole state, init_from only its weights into a new run")
        if self.checkpoint.resume_from is not None and self.checkpoint.resume == "never":
            raise ValueError("checkpoint.resume_from needs checkpoint.resume auto or required, not never")
        if needs_val and self.data.validation_size == 0:
            raise ValueError(f"data.validation_size is 0 but {needs_val[0]} needs a validation split")
        if self.data.source == "synthetic" and self.data.validation_size >= self.data.synthetic.train_size:
            raise ValueError("data.validation_size must be smaller than data.synthetic.train_size")
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that give stored training state its meaning.

        Resuming under different values would load weights or optimizer slots
        into a different problem; stop conditions (epochs, max_steps, early
        stopping) and where things are stored may change freely, except
        epochs under a schedule that spans them (HORIZON_SCHEDULES).
        """
        d = self.model_dump(mode="json")
        horizon = {"train.epochs": d["train"]["epochs"]} if self.train.lr_schedule.name in HORIZON_SCHEDULES else {}
        return {
            "seed": d["seed"],
            "data.source": d["data"]["source"],
            "data.synthetic": d["data"]["synthetic"],
            "data.validation_size": d["data"]["validation_size"],
            "data.augment": d["data"]["augment"],
            "data.translate": d["data"]["translate"],
            "model.name": d["model"]["name"],
            "model.width": d["model"]["width"],
            "train.optimizer": d["train"]["optimizer"],
            "train.batch_size": d["train"]["batch_size"],
            "train.mixed_precision": d["train"]["mixed_precision"],
            **horizon,
        }


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = _as_mapping(child)
        node = child
    node[leaf] = value


# Keys whose value may be a name alone or a mapping with `name` and parameters.
_NAMED = {"lr_schedule"}


def _as_mapping(value: Any) -> dict:
    # A name given alone (`lr_schedule: cosine`) still takes parameters set
    # beside it from another source (`--set train.lr_schedule.warmup_epochs=1`).
    return {"name": value} if isinstance(value, str) else {}


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and key in out:
            below = out[key] if isinstance(out[key], dict) else _as_mapping(out[key])
            out[key] = _deep_merge(below, value)
        elif (
            key in _NAMED
            and isinstance(value, str)
            and isinstance(out.get(key), dict)
            and out[key].get("name", value) == value
        ):
            # `--set train.lr_schedule=cosine` names the schedule whose
            # parameters a lower source set (`warmup_epochs: 1`, with or
            # without the same name): keep them. Naming a different schedule
            # replaces the lower one whole.
            out[key] = {**out[key], "name": value}
        else:
            out[key] = value
    return out


def typed(raw: str) -> Any:
    """A value given as text (`--set`, a SageMaker hyperparameter), typed:
    YAML gives `3`, `true`, `null` and `[1, 2]` their natural types."""
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        # Not YAML, so plain text; validation names the field if text is wrong there.
        return raw


def merge_dotted(items: Iterable[tuple[str, Any]]) -> dict:
    """Dotted keys and their values, in order, as one nested dict."""
    tree: dict = {}
    for key, value in items:
        one: dict = {}
        _set_dotted(one, key, value)
        # Merged like the sources are, so `train.lr_schedule=cosine` after
        # `train.lr_schedule.warmup_epochs=1` keeps the parameter.
        tree = _deep_merge(tree, one)
    return tree


def parse_overrides(pairs: list[str]) -> dict:
    items = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        items.append((key.strip(), typed(raw)))
    return merge_dotted(items)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        # A discriminated union puts the chosen tag into the location
        # (`train.lr_schedule.cosine.bogus`); users wrote no such key.
        where = ".".join(str(p) for p in item["loc"] if p not in _SCHEDULE_NAMES)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                platform: bool = True) -> Config:
    """Resolve the config: defaults < file < platform < environment < --set.

    The platform layer is SageMaker's or Vertex AI's container conventions
    (job/platform.py); `platform=False` leaves it out, for a config resolved
    here to run somewhere else (`submit`).
    """
    file_values = read_yaml(path) if path is not None else {}
    set_values = parse_overrides(overrides or [])
    # Environment values must beat the file but lose to --set, and
    # pydantic-settings ranks init kwargs above the environment, so the file
    # and --set are merged here and the environment slotted between them.
    env_values = _environment()
    platform_values = _platform(os.environ) if platform else {}
    merged = _deep_merge(_deep_merge(_deep_merge(file_values, platform_values), env_values), set_values)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def _platform(environ: Mapping[str, str]) -> dict:
    """The platform layer: its conventions, and above them SageMaker
    hyperparameters, which are dotted keys like `--set`'s and merge the same way."""
    hps = merge_dotted((key, typed(value) if isinstance(value, str) else value)
                       for key, value in hyperparameters(environ))
    return _deep_merge(platform_overrides(environ), hps)


def _environment() -> dict:
    """`CIFAR_TRAIN__EPOCHS=3` as `{"train": {"epochs": "3"}}`, via pydantic-settings' own parser."""
    try:
        return EnvSettingsSource(Config, case_sensitive=False)()
    except SettingsError as exc:
        # A section given as JSON (`CIFAR_TRAIN='{...}'`) that does not parse.
        raise ConfigError(f"invalid environment override (CIFAR_*): {exc}") from None

