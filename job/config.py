"""The job's configuration: one pydantic model, read from a YAML file, the
environment (`CIFAR_TRAIN__EPOCHS=3`) and `--set train.epochs=3`, in rising
precedence. Unknown keys are errors everywhere, so a typo never silently
trains with a default.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from common.redact import redact_data
from job import storage
from job.errors import ConfigError
from job.platform import hyperparameters, platform_overrides


def _location(value: str | None, schemes: tuple[str, ...] = ("s3",)) -> str | None:
    """A URI that can name a location at all (syntax only: a config check
    touches no storage). `s3://` and `s3:///x` name no bucket; they would
    otherwise pass here and fail at the first write, as a storage error."""
    if not isinstance(value, str):
        return value
    scheme, sep, _ = value.partition("://")
    if sep and scheme not in schemes:
        raise ValueError(f"{value!r}: the {scheme}:// scheme is not supported; use a local path or "
                         + " or ".join(f"{s}://" for s in schemes))
    problem = storage.malformed(value)
    if problem:
        raise ValueError(problem)
    return value


# A local path or s3://bucket/prefix.
Location = Annotated[str, AfterValidator(_location)]


class Section(BaseModel):
    # `--set export.model_name=2024` reaches here as YAML's int 2024; the
    # environment gives the string "2024". Both mean the same name.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class SyntheticData(Section):
    # At most CIFAR-10's size, which the synthetic set stands in for: generating
    # takes about 145 KB of memory per example (peak RSS of sources.synthetic(n, 1):
    # 1.5 GB for 10,000, 2.9 GB for 20,000), and 10**12 ended in a MemoryError.
    train_size: int = Field(10_000, ge=1, le=60_000, description="Training examples generated; the validation "
                                                                 "split is held out of these.")
    test_size: int = Field(2_000, ge=1, le=60_000, description="Test examples generated.")


class Data(Section):
    source: Literal["synthetic", "cifar10", "folder"] = Field(
        "synthetic",
        description="`synthetic`: built in, CIFAR-shaped class patterns a small CNN learns in a few epochs. "
                    "`cifar10`: the CIFAR-10 data set at `data.uri`, in its binary or python format. "
                    "`folder`: images laid out as `train/<class>/*.png|jpg|jpeg` and "
                    "`test/<class>/*.png|jpg|jpeg` (the layout of the common PNG and JPEG copies of CIFAR-10), "
                    "exactly 10 class folders, the same in both; the folder names, sorted, are the classes and "
                    "label the export. Each image is converted to RGB and resized to 32x32 by the function the "
                    "service applies to `/predict` uploads.",
    )
    uri: Annotated[str | None, AfterValidator(lambda v: _location(v, ("s3", "http", "https")))] = Field(
        None,
        description="For `cifar10`: a local directory or `.tar.gz`, an `s3://` object or prefix (a prefix "
                    "reads like a directory), or an `http(s)://` URL; null means the canonical CIFAR-10 binary "
                    "archive, downloaded once, MD5-verified and cached. For `folder` (required): a local "
                    "directory, a `.tar.gz` or `.zip` of one (local or `s3://`), or an `s3://` prefix. What "
                    "comes from S3 is cached object by object under its ETag: a second run downloads nothing, "
                    "a replaced object is fetched again.",
    )
    cache_dir: str = Field("~/.cache/cifar10-pipeline",
                           description="Where downloads and copies of S3 objects are kept across runs.")
    synthetic: SyntheticData = SyntheticData()
    validation_size: int = Field(
        1_000, ge=0,
        description="Training examples held out for validation, chosen by `seed`. 0 for none, which "
                    "`train.early_stopping`, the `reduce_on_plateau` schedule and `export.weights: best` refuse.",
    )
    augment: bool = Field(False, description="Each epoch, shift each training image by up to `data.translate` "
                                             "pixels at random (reflect padding, then a 32x32 crop) and flip it "
                                             "horizontally with probability 1/2.")
    translate: int = Field(4, ge=0, le=16, description="With `data.augment`: the most pixels an image is shifted "
                                                       "by in each direction; 0 for flips alone.")
    flip: Literal["random", "alternating"] = Field(
        "random",
        description="With `data.augment`: `random` flips each image with probability 1/2 each epoch; "
                    "`alternating` flips a random half in the first epoch and then flips each image every other "
                    "epoch, so that every two epochs show both sides of every image (airbench's choice).",
    )


class Model(Section):
    name: Literal["simple_cnn", "resnet", "airbench"] = Field(
        "simple_cnn",
        description="`simple_cnn`: the original recipe's conv32-pool-conv64-pool-conv64-dense64-dense10. "
                    "`resnet`: ResNet-20. `airbench`: airbench94's network, a whitening layer computed from the "
                    "first 5,000 training images, then three conv-pool-BatchNorm-GELU groups of 64, 256 and 256 "
                    "channels.",
    )
    width: float = Field(1.0, gt=0, le=8,
                         description="Multiplies the network's channel counts (each stays at least 8): 0.5 is a "
                                     "network about four times cheaper.")
    tta: Literal["none", "flip", "flip_translate"] = Field(
        "none",
        description="Test-time augmentation: inference averages the logits of each image and its mirror "
                    "(`flip`), and also of both shifted one pixel up-left and down-right (`flip_translate`, six "
                    "passes). It is the model's own inference, so validation, the test figure and the exported "
                    "model all include it, at that many times the cost per image.",
    )
    init_from: Annotated[str | None, AfterValidator(_location)] = Field(
        None,
        description="Start a new run from another run's weights: its `checkpoint.uri` (its newest checkpoint) or "
                    "one of its `.../ckpt-<step>` directories. The network must match (`model.name`, "
                    "`model.width`); the optimizer starts afresh. A run that resumes its own checkpoint ignores it.",
    )


class Constant(Section):
    name: Literal["constant"] = Field("constant", description="`train.learning_rate` throughout.")


class Exponential(Section):
    name: Literal["exponential"] = Field(
        description="`train.learning_rate`, multiplied by `decay_rate` every `decay_epochs`, smoothly in between.")
    decay_rate: float = Field(0.96, gt=0, le=1, description="The learning rate's factor per `decay_epochs`.")
    decay_epochs: float = Field(1.0, gt=0, description="Epochs over which the learning rate falls by `decay_rate`.")


class Cosine(Section):
    name: Literal["cosine"] = Field(
        description="a linear warm-up over `warmup_epochs`, then a cosine from `train.learning_rate` down to "
                    "`final_fraction` of it at the end of `train.epochs`.")
    warmup_epochs: float = Field(0.0, ge=0, description="Epochs of linear warm-up from near 0; 0 for none.")
    final_fraction: float = Field(0.0, ge=0, le=1, description="The learning rate at the end of `train.epochs`, "
                                                               "as a fraction of `train.learning_rate`.")


class OneCycle(Section):
    name: Literal["one_cycle"] = Field(
        description="linear from `start_fraction` of `train.learning_rate` up to all of it at `peak_at`, then "
                    "linear down to `final_fraction` of it at the end of `train.epochs`.")
    peak_at: float = Field(0.25, gt=0, lt=1, description="Fraction of the run (`train.epochs`) spent rising to "
                                                         "the peak.")
    start_fraction: float = Field(0.1, gt=0, le=1, description="The learning rate at step 0, as a fraction of "
                                                               "`train.learning_rate`.")
    final_fraction: float = Field(0.0, ge=0, le=1, description="The learning rate at the end of `train.epochs`, "
                                                               "as a fraction of `train.learning_rate`.")


class ReduceOnPlateau(Section):
    name: Literal["reduce_on_plateau"] = Field(
        description="`train.learning_rate`, multiplied by `factor` each time `monitor` has gone more than "
                    "`patience` epochs without improving, never below `min_lr`; needs a validation split.")
    monitor: Literal["val_loss", "val_accuracy"] = Field("val_loss", description="The metric watched, after "
                                                                                 "each epoch.")
    factor: float = Field(0.5, gt=0, lt=1, description="Multiplies the learning rate at each reduction.")
    patience: int = Field(2, ge=0, description="Epochs without improvement tolerated; the next one reduces the "
                                               "learning rate.")
    min_lr: float = Field(0.0, ge=0, description="The floor under the learning rate.")


_SCHEDULES = (Constant, Exponential, Cosine, OneCycle, ReduceOnPlateau)
Schedule = Annotated[Union[_SCHEDULES], Field(discriminator="name")]  # noqa: UP007
_SCHEDULE_NAMES = {get_args(s.model_fields["name"].annotation)[0] for s in _SCHEDULES}
# Schedules whose curve spans `train.epochs`: for them the epochs are fixed
# when a run starts (they are in its fingerprint), as a resume under another
# value would bend the curve mid-run. The others take epochs as a stop only.
HORIZON_SCHEDULES = ("cosine", "one_cycle")


class EarlyStopping(Section):
    enabled: bool = Field(False, description="Stop training once `monitor` has not improved for `patience` "
                                             "epochs; needs a validation split.")
    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss",
        description="The metric watched. While early stopping is enabled it also names the best checkpoint "
                    "(`restore_best`, `export.weights: best`); otherwise `val_loss` does.",
    )
    patience: int = Field(3, ge=1, description="Epochs without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0, description="The least change of the metric that counts as an "
                                                    "improvement.")
    restore_best: bool = Field(True, description="When training stops early, export the best checkpoint's "
                                                 "weights rather than the last.")


class Lookahead(Section):
    enabled: bool = Field(False, description="Keep slow weights beside the network's (airbench's lookahead): "
                                             "every `every_steps` steps they move towards the network's weights "
                                             "and the network is reset to them; the run ends on them.")
    every_steps: int = Field(5, ge=1, description="Steps between two updates of the slow weights.")
    decay: float = Field(0.95, gt=0, lt=1,
                         description="How much of the slow weights an update keeps, per step between updates, at "
                                     "the end of the run; it rises from 0 as the cube of the run's progress "
                                     "(`train.epochs`), so early updates all but copy the network's weights.")


class Train(Section):
    epochs: int = Field(
        10, ge=1,
        description="Passes over the training split. Under `cosine` and `one_cycle`, the schedule's horizon, "
                    "fixed for the run (a resume with other epochs exits 2); under other schedules a stop "
                    "condition that a resume may change.",
    )
    batch_size: int = Field(64, ge=1, description="Examples per step, across all replicas (a multiple of their "
                                                  "number); each epoch's last partial batch is dropped.")
    max_steps: int | None = Field(None, ge=1,
                                  description="Stop after this many steps, a stop condition only (schedules follow "
                                              "`train.epochs`); a finished run carries on when it is raised.")
    # Results do not depend on it because the same ops run in the same order.
    steps_per_loop: int = Field(10, ge=1,
                                description="Steps run inside one compiled call: fewer Python round trips make "
                                            "each step cheaper; results do not depend on it.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="The optimizer.")
    learning_rate: float = Field(0.001, gt=0, description="The peak learning rate, which `train.lr_schedule` "
                                                          "scales.")
    momentum: float = Field(0.9, ge=0, lt=1, description="For `sgd` only.")
    nesterov: bool = Field(False, description="Nesterov momentum, for `sgd` only.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay, times the learning rate, for "
                                                       "every optimizer; 0 for none.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss "
                                                                "(validation and test losses have none).")
    lr_schedule: Schedule = Field(
        Constant(),
        description="The learning-rate schedule: a name alone (`lr_schedule: cosine`) or with its parameters "
                    "beside it (`{name: cosine, warmup_epochs: 1}`).",
    )
    early_stopping: EarlyStopping = EarlyStopping()
    lookahead: Lookahead = Lookahead()
    mixed_precision: bool | Literal["float16", "bfloat16"] = Field(
        False,
        description="Compute in 16 bits, weights kept in float32. `true` or `float16`: with loss scaling, for "
                    "GPUs (CPUs run float16 convolutions far slower than float32). `bfloat16`: no loss scaling "
                    "needed; for CPUs with AMX or AVX512-BF16 and recent GPUs. Evaluation and export use a "
                    "float32 copy of the trained weights either way.",
    )
    jit_compile: bool = Field(False, description="Compile the training and evaluation steps with XLA; needs "
                                                 "`train.deterministic: false`.")
    deterministic: bool = Field(True, description="Deterministic kernels: a run stopped and resumed ends "
                                                  "exactly where an uninterrupted one does, and reruns repeat. "
                                                  "Measured in float32, and in bfloat16 on a CPU for the fast "
                                                  "recipe: two whole runs in separate processes gave the same "
                                                  "test accuracy and the same validation accuracy at each of the "
                                                  "16 epochs compared (before its BatchNorm was fused, two "
                                                  "bfloat16 runs differed). Not measured on a GPU.")
    log_every_steps: int = Field(50, ge=1, description="Steps between progress lines (and TensorBoard "
                                                       "scalars); each epoch's end prints one too.")

    @property
    def dtype_policy(self) -> str:
        """Keras' name for the compute precision."""
        return {False: "float32", True: "mixed_float16", "float16": "mixed_float16",
                "bfloat16": "mixed_bfloat16"}[self.mixed_precision]

    @field_validator("lr_schedule", mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        # `lr_schedule: cosine` is shorthand for `lr_schedule: {name: cosine}`.
        return {"name": value} if isinstance(value, str) else value


class Checkpoint(Section):
    uri: Location = Field("runs/default/checkpoints",
                     description="Where checkpoints, `latest.json`, `metrics.jsonl` and the run's `config.yaml` "
                                 "go: a local path or `s3://bucket/prefix`; one run at a time. Before training, "
                                 "the job writes and removes a marker there (exit 4 if it cannot).")
    every_steps: int = Field(500, ge=1, description="Commit a checkpoint every this many steps, besides the one "
                                                    "at each epoch's end.")
    every_seconds: float | None = Field(
        None, gt=0,
        description="Also commit once this many seconds of wall-clock time have passed since the last commit "
                    "(spot capacity, where a step count says nothing about the time a reclaim loses); looked at "
                    "between compiled calls, so a commit can land up to `train.steps_per_loop` steps late.",
    )
    keep: int = Field(3, ge=1, description="Newest checkpoints kept (the best is kept as well).")
    resume: Literal["auto", "never", "required"] = Field(
        "auto",
        description="`auto`: carry on from the newest checkpoint in `checkpoint.uri`, if any. `never`: start "
                    "from step 0 whatever it holds. `required`: exit 2 where it holds none.",
    )
    resume_from: int | str | None = Field(
        None,
        description="Restart from this checkpoint rather than the newest: a kept step of this run, another "
                    "run's `checkpoint.uri` (its newest) or a `.../ckpt-<step>` directory. The run goes on in "
                    "its own `checkpoint.uri`.",
    )
    retry_seconds: float = Field(
        300.0, gt=0,
        description="How long a storage write retries through an outage (S3 unreachable, throttled, failing) "
                    "before the job gives up (exit 4): each checkpoint commit, the run's files beside it, and "
                    "the final export. A failure waiting cannot mend (a full disk, a read-only mount, a denied "
                    "write, a missing bucket) exits 4 at once.")
    grace_seconds: float = Field(30.0, gt=0, description="After SIGTERM, how long the current checkpoint gets "
                                                         "to commit before the job exits (75).")
    lease_seconds: float = Field(60.0, ge=1, description="A run killed while holding `checkpoint.uri` blocks "
                                                         "the next one for at most this long.")

    @field_validator("resume_from", mode="before")
    @classmethod
    def _step_as_int(cls, value: Any) -> Any:
        # The environment gives every value as a string; `40` is a step wherever it comes from.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("resume_from")
    @classmethod
    def _resume_location(cls, value: int | str | None) -> int | str | None:
        return _location(value)


class Export(Section):
    uri: Location = Field("runs/default/export", description="Where versions go, as "
                                                        "`<export.uri>/<model_name>/<version>/`: a local path or "
                                                        "`s3://bucket/prefix`. Before training, the job "
                                                        "writes and removes a marker in "
                                                        "`<export.uri>/<model_name>` (exit 4 if it cannot).")
    model_name: str = Field("cifar10", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="The model's folder under `export.uri`, and the model name its TF "
                                        "Serving warm-up requests use.")
    weights: Literal["last", "best"] = Field(
        "last",
        description="`last`: the weights training ended with. `best`: those of the checkpoint with the best "
                    "validation result (see `train.early_stopping.monitor`).",
    )


class Distribute(Section):
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = Field(
        "auto",
        description="`auto` reads the environment: several workers in `TF_CONFIG` or an AWS Batch multi-node "
                    "job mean `multi_worker`; several local GPUs or `distribute.cpu_devices` > 1, `mirrored`; "
                    "else `one_device`. Naming one insists on it.",
    )
    cpu_devices: int = Field(1, ge=1, le=64, description="Split the host's CPU into this many logical devices, "
                                                         "each a replica: rehearses mirrored training without "
                                                         "GPUs.")
    port: int = Field(2222, ge=1024, le=65000,
                      description="AWS Batch multi-node jobs: the nodes meet at this port of the main node to learn "
                                  "each other's addresses; node i's TensorFlow server uses port + 1 + i.")
    startup_timeout_seconds: float = Field(300.0, gt=0, description="How long workers wait for each other at "
                                                                    "start before the job fails (exit 75).")


class Tracking(Section):
    mlflow_uri: str | None = Field(
        None,
        description="An MLflow tracking server (`http(s)://host:port`) to log the run to: its config as params, "
                    "each epoch's metrics, lineage tags, `curves.png` and the model card. Null: "
                    "`MLFLOW_TRACKING_URI` if set, else no tracking. Needs the `tracking` extra (`mlflow-skinny`, in "
                    "the training image); a server that is down or refuses never fails the run.",
    )
    experiment: str = Field("cifar10", min_length=1, max_length=500,
                            description="The MLflow experiment the run goes in, created if missing.")
    exit_seconds: float = Field(10.0, gt=0, le=600,
                                description="At the job's end, how long it waits for the tracking server to take "
                                            "what is still queued before it exits without it.")


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix="CIFAR_", env_nested_delimiter="__"
    )

    # numpy's and TensorFlow's seeds are unsigned 32-bit integers.
    seed: int = Field(0, ge=0, lt=2**32,
                      description="Seeds the initial weights, the validation split, each epoch's order and "
                                  "augmentation; each depends on it alone.")
    data: Data = Data()
    model: Model = Model()
    train: Train = Train()
    checkpoint: Checkpoint = Checkpoint()
    export: Export = Export()
    distribute: Distribute = Distribute()
    tracking: Tracking = Tracking()

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
        """The config as YAML to show or save, with URL credentials hidden
        (common/redact.py): a presigned `data.uri` is a credential. Nothing
        reads it back to resume: the fingerprint, not the URI, must match."""
        return yaml.safe_dump(redact_data(self.model_dump(mode="json")), sort_keys=False)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that give stored training state its meaning.

        Resuming under different values would load weights or optimizer slots
        into a different problem; stop conditions (epochs, max_steps, early
        stopping) and where things are stored may change freely, except
        epochs under a schedule that spans them (HORIZON_SCHEDULES).
        """
        d = self.model_dump(mode="json")
        spans = self.train.lr_schedule.name in HORIZON_SCHEDULES or self.train.lookahead.enabled
        horizon = {"train.epochs": d["train"]["epochs"]} if spans else {}
        return {
            "seed": d["seed"],
            "data.source": d["data"]["source"],
            "data.synthetic": d["data"]["synthetic"],
            "data.validation_size": d["data"]["validation_size"],
            "data.augment": d["data"]["augment"],
            "data.translate": d["data"]["translate"],
            "data.flip": d["data"]["flip"],
            "model.name": d["model"]["name"],
            "model.width": d["model"]["width"],
            "train.optimizer": d["train"]["optimizer"],
            "train.batch_size": d["train"]["batch_size"],
            "train.mixed_precision": d["train"]["mixed_precision"],
            "train.lookahead": d["train"]["lookahead"],
            **horizon,
        }


# A config file is a few kilobytes; these bound what a careless or hostile
# one can cost (/dev/zero, a FIFO, YAML nested until Python's stack gives out).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32  # levels of nesting; the schema needs 4 (train.lr_schedule.name and its value)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    if len(parents) >= MAX_DEPTH:  # merging such keys recurses per level
        raise ConfigError(f"the key {_clipped(dotted)!r}: nested deeper than {MAX_DEPTH} levels")
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


class _Refused(Exception):
    """YAML that parses but that no config may be: a key given twice, nesting deeper than MAX_DEPTH."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader refusing to nest deeper than MAX_DEPTH: its composer
    recurses per level, and would end in a RecursionError."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels (line {self.peek_event().start_mark.line + 1})")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_unique_keys(node: yaml.Node, path: tuple[str, ...] = (), seen: set[int] | None = None) -> None:
    """A key given twice in one mapping, which YAML loaders settle silently
    (the last wins): the first value would then be ignored without a word."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    children = node.value if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) else []
    lines: dict[str, int] = {}
    for child in children:
        key, value = child if isinstance(node, yaml.MappingNode) else (None, child)
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # merge keys may repeat
            dotted = ".".join((*path, key.value))
            if key.value in lines:
                raise _Refused(f"key {dotted!r} appears twice, on lines {lines[key.value]} and "
                               f"{key.start_mark.line + 1}")
            lines[key.value] = key.start_mark.line + 1
        _check_unique_keys(value, (*path, key.value) if isinstance(key, yaml.ScalarNode) else path, seen)


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a key given twice in a mapping and deep nesting (_Refused)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def typed(raw: str) -> Any:
    """A value given as text (`--set`, a SageMaker hyperparameter), typed:
    YAML gives `3`, `true`, `null` and `[1, 2]` their natural types."""
    try:
        return _load_yaml(raw) if raw else ""
    except _Refused as exc:
        raise ConfigError(f"the value {_clipped(raw)!r}: {exc}") from None
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


def _clipped(text: str, limit: int = 80) -> str:
    """`text` short enough to quote in a one-line message."""
    return text if len(text) <= limit else text[:limit] + "..."


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        # Checked before opening: opening a FIFO waits for a writer, and a
        # device such as /dev/zero never ends.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
        loaded = _load_yaml(raw.decode())
    except _Refused as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
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
    except (SettingsError, RecursionError) as exc:
        # A section given as JSON (`CIFAR_TRAIN='{...}'`) that does not parse,
        # or nests deeper than json.loads recurses.
        raise ConfigError(f"invalid environment override (CIFAR_*): {exc}") from None

