"""`job.config.load_config`: defaults, precedence, typing and every way a config is refused.

Fast and TensorFlow-free: nothing here imports more than job.config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
import yaml

from job.config import Config, load_config
from job.errors import ConfigError


pytestmark = pytest.mark.usefixtures("no_cifar_env")  # no CIFAR_* variable from outside leaks into a test


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(*needles, path=None, sets=()):
    """load_config must raise ConfigError whose message names every needle."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(sets))
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- defaults -----------------------------------------------------------------


def test_defaults_reproduce_the_seeds_recipe():
    cfg = load_config()
    assert cfg.model.name == "simple_cnn"
    assert cfg.train.optimizer == "adam"
    assert cfg.train.learning_rate == 0.001
    assert cfg.train.lr_schedule.name == "constant"
    assert cfg.train.batch_size == 64
    assert cfg.train.epochs == 10
    assert cfg.train.max_steps is None
    assert cfg.data.augment is False
    assert cfg.data.source == "synthetic"
    assert cfg.train.deterministic is True
    assert cfg.checkpoint.resume == "auto"
    assert cfg.export.model_name == "cifar10"


def test_an_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == load_config()
    assert load_config(write(tmp_path, "# nothing but a comment\n", "c.yaml")) == load_config()


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.train.epochs = 3  # type: ignore[misc]


# --- precedence: --set > environment > file > defaults --------------------------


def test_file_beats_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 5\n"))
    assert cfg.train.epochs == 5
    assert cfg.train.batch_size == 64  # untouched keys keep their defaults


def test_environment_beats_defaults(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "3")
    assert load_config().train.epochs == 3


def test_environment_beats_file(tmp_path, monkeypatch):
    path = write(tmp_path, "train:\n  epochs: 5\n  batch_size: 32\n")
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "3")
    cfg = load_config(path)
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 32  # the file's sibling key survives the merge


def test_set_beats_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n  batch_size: 32\n")
    cfg = load_config(path, ["train.epochs=7"])
    assert cfg.train.epochs == 7
    assert cfg.train.batch_size == 32


def test_set_beats_environment(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "3")
    assert load_config(None, ["train.epochs=7"]).train.epochs == 7


def test_set_beats_environment_beats_file_all_at_once(tmp_path, monkeypatch):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: 5\n  batch_size: 32\n  learning_rate: 0.1\n")
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "3")
    monkeypatch.setenv("CIFAR_TRAIN__BATCH_SIZE", "16")
    cfg = load_config(path, ["train.epochs=7"])
    assert (cfg.seed, cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (1, 7, 16, 0.1)


def test_last_set_of_the_same_key_wins():
    assert load_config(None, ["train.epochs=2", "train.epochs=4"]).train.epochs == 4


def test_environment_nested_two_levels_and_top_level(monkeypatch):
    monkeypatch.setenv("CIFAR_DATA__SYNTHETIC__TRAIN_SIZE", "5000")
    monkeypatch.setenv("CIFAR_SEED", "9")
    monkeypatch.setenv("CIFAR_TRAIN__EARLY_STOPPING__ENABLED", "true")
    cfg = load_config()
    assert cfg.data.synthetic.train_size == 5000
    assert cfg.seed == 9
    assert cfg.train.early_stopping.enabled is True


def test_environment_section_as_json(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN", '{"epochs": 4}')
    assert load_config().train.epochs == 4


def test_unrelated_cifar_variables_are_ignored(monkeypatch):
    # Only the config's own sections are read from the environment.
    monkeypatch.setenv("CIFAR_SOMETHING_ELSE", "1")
    assert load_config() == Config.model_validate({})


# --- --set typing and dotted keys ------------------------------------------------


def test_set_gives_values_their_natural_types():
    cfg = load_config(None, [
        "train.epochs=3",
        "train.learning_rate=1e-3",
        "train.weight_decay=0.0005",
        "train.mixed_precision=true",
        "train.deterministic=false",
        "data.augment=yes",
        "train.max_steps=null",
        "data.source=synthetic",
    ])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.learning_rate == pytest.approx(0.001) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.weight_decay == pytest.approx(0.0005)
    assert cfg.train.mixed_precision is True
    assert cfg.train.deterministic is False
    assert cfg.data.augment is True
    assert cfg.train.max_steps is None


def test_set_null_clears_a_value_the_file_set(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 100\n")
    assert load_config(path).train.max_steps == 100
    assert load_config(path, ["train.max_steps=null"]).train.max_steps is None


def test_set_dotted_nested_keys():
    cfg = load_config(None, [
        "data.synthetic.train_size=500",
        "data.synthetic.test_size=100",
        "data.validation_size=50",
        "train.early_stopping.patience=5",
        "checkpoint.uri=s3://bucket/runs/1",
        "export.model_name=cifar_resnet",
        "seed=42",
    ])
    assert cfg.data.synthetic.train_size == 500
    assert cfg.data.synthetic.test_size == 100
    assert cfg.data.validation_size == 50
    assert cfg.train.early_stopping.patience == 5
    assert cfg.checkpoint.uri == "s3://bucket/runs/1"
    assert cfg.export.model_name == "cifar_resnet"
    assert cfg.seed == 42


def test_set_value_may_contain_equals_signs_and_spaces():
    cfg = load_config(None, ["data.uri=s3://bucket/x?a=b", " train.epochs = 3"])
    assert cfg.data.uri == "s3://bucket/x?a=b"
    assert cfg.train.epochs == 3


def test_set_numeric_looking_string_fields_stay_strings(monkeypatch):
    # YAML types `2024` as an int; a name is still a name, as it is from the environment.
    assert load_config(None, ["export.model_name=2024"]).export.model_name == "2024"
    assert load_config(None, ["checkpoint.uri=123"]).checkpoint.uri == "123"
    monkeypatch.setenv("CIFAR_EXPORT__MODEL_NAME", "2024")
    assert load_config().export.model_name == "2024"


def test_set_value_that_is_not_yaml_is_text():
    # `[` opens a YAML list that never closes: the value is taken as written.
    assert load_config(None, ["checkpoint.uri=[runs]/a[b"]).checkpoint.uri == "[runs]/a[b"


def test_set_a_whole_section_as_a_flow_mapping():
    cfg = load_config(None, ["train={epochs: 2, batch_size: 8}"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, 8)


# --- lr_schedule: a name alone, or a name with its parameters beside it ---------------


def test_lr_schedule_name_shorthand_in_file_and_set(tmp_path):
    assert load_config(None, ["train.lr_schedule=cosine"]).train.lr_schedule.name == "cosine"
    path = write(tmp_path, "train:\n  lr_schedule: one_cycle\n")
    assert load_config(path).train.lr_schedule.name == "one_cycle"


def test_lr_schedule_full_mapping(tmp_path):
    path = write(tmp_path, "train:\n  lr_schedule:\n    name: exponential\n    decay_rate: 0.9\n")
    schedule = load_config(path).train.lr_schedule
    assert (schedule.name, schedule.decay_rate, schedule.decay_epochs) == ("exponential", 0.9, 1.0)


@pytest.mark.parametrize("file,env,sets", [
    ("train:\n  lr_schedule: cosine\n", {}, ["train.lr_schedule.warmup_epochs=1"]),
    ("train:\n  lr_schedule:\n    warmup_epochs: 1\n", {}, ["train.lr_schedule=cosine"]),
    (None, {"CIFAR_TRAIN__LR_SCHEDULE": "cosine"}, ["train.lr_schedule.warmup_epochs=1"]),
    (None, {"CIFAR_TRAIN__LR_SCHEDULE__WARMUP_EPOCHS": "1"}, ["train.lr_schedule=cosine"]),
], ids=["name-in-file", "parameter-in-file", "name-in-env", "parameter-in-env"])
def test_lr_schedule_name_and_parameter_from_different_sources(tmp_path, monkeypatch, file, env, sets):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, file) if file else None
    schedule = load_config(path, sets).train.lr_schedule
    assert (schedule.name, schedule.warmup_epochs) == ("cosine", 1.0)


def test_lr_schedule_name_and_parameter_both_from_set_in_either_order():
    for sets in (["train.lr_schedule=cosine", "train.lr_schedule.warmup_epochs=2"],
                 ["train.lr_schedule.warmup_epochs=2", "train.lr_schedule=cosine"]):
        schedule = load_config(None, sets).train.lr_schedule
        assert (schedule.name, schedule.warmup_epochs) == ("cosine", 2.0), sets


def test_lr_schedule_restating_the_same_name_keeps_the_file_parameters(tmp_path):
    path = write(tmp_path, "train:\n  lr_schedule: {name: cosine, warmup_epochs: 2}\n")
    schedule = load_config(path, ["train.lr_schedule=cosine"]).train.lr_schedule
    assert (schedule.name, schedule.warmup_epochs) == ("cosine", 2.0)


def test_lr_schedule_naming_another_schedule_replaces_the_file_one(tmp_path):
    path = write(tmp_path, "train:\n  lr_schedule: {name: cosine, warmup_epochs: 2}\n")
    schedule = load_config(path, ["train.lr_schedule=exponential"]).train.lr_schedule
    assert schedule.name == "exponential"
    assert not hasattr(schedule, "warmup_epochs")


def test_lr_schedule_set_name_overrides_file_name_keeping_set_parameters(tmp_path):
    path = write(tmp_path, "train:\n  lr_schedule: exponential\n")
    overrides = ["train.lr_schedule.name=cosine", "train.lr_schedule.warmup_epochs=1"]
    schedule = load_config(path, overrides).train.lr_schedule
    assert (schedule.name, schedule.warmup_epochs) == ("cosine", 1.0)


# --- every way a config is refused names the field -------------------------------------


def test_unknown_top_level_key_in_file(tmp_path):
    refused("trian", path=write(tmp_path, "trian:\n  epochs: 3\n"))


def test_unknown_top_level_key_from_set():
    refused("trian", sets=["trian.epochs=3"])
    refused("bogus", sets=["bogus=1"])


def test_unknown_nested_key_in_file(tmp_path):
    refused("train.epoch", path=write(tmp_path, "train:\n  epoch: 3\n"))
    refused("data.synthetic.train_sise", path=write(tmp_path, "data:\n  synthetic:\n    train_sise: 3\n", "b.yaml"))


def test_unknown_nested_key_from_environment(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN__EPOCH", "3")
    refused("train.epoch")


def test_unknown_nested_key_from_set():
    refused("train.epoch", sets=["train.epoch=3"])
    refused("checkpoint.every_step", sets=["checkpoint.every_step=3"])


@pytest.mark.parametrize("pair, field", [
    ("train.epochs=three", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.batch_size=[64]", "train.batch_size"),
    ("train.learning_rate=fast", "train.learning_rate"),
    ("train.mixed_precision=maybe", "train.mixed_precision"),
    ("seed=abc", "seed"),
    ("data.synthetic=10", "data.synthetic"),
    ("train=3", "train"),
])
def test_wrong_type(pair, field):
    refused(field, sets=[pair])


def test_wrong_type_from_environment(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN__EPOCHS", "x")
    refused("train.epochs")


def test_wrong_type_in_file(tmp_path):
    refused("train.batch_size", path=write(tmp_path, "train:\n  batch_size: big\n"))
    refused("train", path=write(tmp_path, "train: [1, 2]\n", "b.yaml"))


@pytest.mark.parametrize("pair, field", [
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.learning_rate=-0.1", "train.learning_rate"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("data.validation_size=-1", "data.validation_size"),
    ("train.label_smoothing=1", "train.label_smoothing"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.momentum=1", "train.momentum"),
    ("data.synthetic.train_size=0", "data.synthetic.train_size"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every_seconds=0", "checkpoint.every_seconds"),
    ("export.model_name=../escape", "export.model_name"),
])
def test_out_of_range(pair, field):
    refused(field, sets=[pair])


@pytest.mark.parametrize("pair, field, allowed", [
    ("train.optimizer=rmsprop", "train.optimizer", "adamw"),
    ("model.name=vgg", "model.name", "resnet"),
    ("data.source=imagenet", "data.source", "cifar10"),
    ("checkpoint.resume=sometimes", "checkpoint.resume", "required"),
    ("train.lr_schedule=linear", "train.lr_schedule", "cosine"),
    ("train.lr_schedule.name=linear", "train.lr_schedule", "one_cycle"),
    ("train.early_stopping.monitor=loss", "train.early_stopping.monitor", "val_accuracy"),
])
def test_bad_enum(pair, field, allowed):
    refused(field, allowed, sets=[pair])  # the message also says what is allowed


@pytest.mark.parametrize("sets, field", [
    (["train.lr_schedule=cosine", "train.lr_schedule.warmup=1"], "train.lr_schedule.warmup"),
    (["train.lr_schedule=cosine", "train.lr_schedule.final_fraction=2"], "train.lr_schedule.final_fraction"),
    (["train.lr_schedule=exponential", "train.lr_schedule.decay_rate=0"], "train.lr_schedule.decay_rate"),
    (["train.lr_schedule=constant", "train.lr_schedule.warmup_epochs=1"], "train.lr_schedule.warmup_epochs"),
    (["train.lr_schedule=one_cycle", "train.lr_schedule.peak_at=1"], "train.lr_schedule.peak_at"),
    (["train.lr_schedule=reduce_on_plateau", "train.lr_schedule.factor=1.5"], "train.lr_schedule.factor"),
    (["train.lr_schedule.warmup_epochs=1"], "train.lr_schedule"),  # parameters but no name
])
def test_bad_lr_schedule_parameter(sets, field):
    message = refused(field, sets=sets)
    # The union's internal tag is not shown as if it were a key the user wrote.
    assert "lr_schedule.cosine" not in message and "lr_schedule.exponential" not in message


def test_validation_size_zero_with_early_stopping():
    refused("data.validation_size", "train.early_stopping",
            sets=["data.validation_size=0", "train.early_stopping.enabled=true"])


def test_validation_size_zero_with_reduce_on_plateau():
    refused("data.validation_size", "reduce_on_plateau",
            sets=["data.validation_size=0", "train.lr_schedule=reduce_on_plateau"])


def test_validation_size_zero_is_fine_otherwise():
    assert load_config(None, ["data.validation_size=0"]).data.validation_size == 0


def test_validation_size_must_be_smaller_than_synthetic_train_size():
    refused("data.validation_size", "data.synthetic.train_size",
            sets=["data.synthetic.train_size=100", "data.validation_size=100"])
    refused("data.validation_size", sets=["data.synthetic.train_size=100", "data.validation_size=500"])
    assert load_config(None, ["data.synthetic.train_size=100", "data.validation_size=99"])


def test_validation_size_is_not_checked_against_synthetic_size_for_cifar10():
    cfg = load_config(None, ["data.source=cifar10", "data.synthetic.train_size=100", "data.validation_size=5000"])
    assert cfg.data.validation_size == 5000


@pytest.mark.parametrize("pair", ["train.epochs", "", "=3", "train.epochs:3"])
def test_malformed_set(pair):
    message = refused("--set", sets=[pair])
    assert "KEY=VALUE" in message


def test_missing_file(tmp_path):
    refused("not found", str(tmp_path / "nope.yaml"), path=tmp_path / "nope.yaml")


def test_directory_as_file(tmp_path):
    refused(str(tmp_path), path=tmp_path)


def test_binary_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    refused(str(path), path=path)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "train:\n  epochs: [3\n")
    refused("not valid YAML", str(path), path=path)


def test_yaml_top_level_list(tmp_path):
    path = write(tmp_path, "- train\n- epochs\n")
    refused("mapping", str(path), path=path)


def test_yaml_top_level_scalar(tmp_path):
    path = write(tmp_path, "just a string\n")
    refused("mapping", str(path), path=path)


def test_environment_section_with_broken_json(monkeypatch):
    monkeypatch.setenv("CIFAR_TRAIN", "not json")
    refused("train")


def test_several_errors_are_all_reported():
    refused("train.epochs", "train.optimizer", sets=["train.epochs=0", "train.optimizer=rmsprop"])


def test_config_error_exit_code_is_two():
    assert ConfigError.exit_code == 2


# --- fingerprint ---------------------------------------------------------------------


BASE = ["data.synthetic.train_size=2000"]


def fingerprint(*sets):
    return load_config(None, [*BASE, *sets]).fingerprint()


@pytest.mark.parametrize("pair", [
    "model.name=resnet",
    "train.optimizer=sgd",
    "train.batch_size=128",
    "seed=1",
    "data.source=cifar10",
    "data.synthetic.train_size=3000",
    "data.synthetic.test_size=500",
    "data.validation_size=500",
    "data.augment=true",
    "data.translate=2",
    "model.width=0.5",
])
def test_fingerprint_changes_with_what_gives_state_its_meaning(pair):
    assert fingerprint(pair) != fingerprint()


@pytest.mark.parametrize("pair", [
    "train.epochs=50",
    "train.max_steps=10",
    "checkpoint.uri=s3://elsewhere/ckpt",
    "checkpoint.every_steps=7",
    "checkpoint.keep=1",
    "export.uri=/tmp/export",
    "train.log_every_steps=1",
])
def test_fingerprint_ignores_stop_conditions_and_storage(pair):
    assert fingerprint(pair) == fingerprint()


def test_fingerprint_is_json_serialisable_and_stable():
    import json

    assert json.loads(json.dumps(fingerprint())) == fingerprint()


# --- dump round trip --------------------------------------------------------------------


@pytest.mark.parametrize("sets", [
    [],
    ["train.lr_schedule=cosine", "train.lr_schedule.warmup_epochs=1", "train.max_steps=100",
     "model.name=resnet", "data.source=cifar10", "data.uri=s3://bucket/cifar", "train.learning_rate=1e-3",
     "export.model_name=2024", "train.early_stopping.enabled=true", "checkpoint.resume=required"],
    ["train.lr_schedule=reduce_on_plateau", "train.lr_schedule.monitor=val_accuracy", "seed=7"],
])
def test_dump_round_trips_through_load(tmp_path, sets):
    cfg = load_config(None, sets)
    text = cfg.dump()
    assert isinstance(yaml.safe_load(text), dict)
    path = write(tmp_path, text, "dumped.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.dump() == text
    assert again.fingerprint() == cfg.fingerprint()


def test_jit_compile_needs_deterministic_off():
    refused("train.jit_compile", "train.deterministic", sets=["train.jit_compile=true"])
    cfg = load_config(None, ["train.jit_compile=true", "train.deterministic=false"])
    assert cfg.train.jit_compile is True and cfg.train.deterministic is False


# --- what a run starts from, what it exports -----------------------------------------------


@pytest.mark.parametrize("schedule, spans_epochs", [
    ("cosine", True), ("one_cycle", True), ("constant", False), ("exponential", False),
])
def test_epochs_are_in_the_fingerprint_only_under_a_schedule_that_spans_them(schedule, spans_epochs):
    changed = fingerprint(f"train.lr_schedule={schedule}", "train.epochs=50") != fingerprint(
        f"train.lr_schedule={schedule}")
    assert changed == spans_epochs


def test_resume_from_a_step_is_a_step_from_any_source(monkeypatch):
    monkeypatch.setenv("CIFAR_CHECKPOINT__RESUME_FROM", "40")
    assert load_config().checkpoint.resume_from == 40
    uri = "s3://bucket/run/checkpoints/ckpt-40"
    assert load_config(None, [f"checkpoint.resume_from={uri}"]).checkpoint.resume_from == uri


def test_resume_from_and_init_from_exclude_each_other():
    refused("checkpoint.resume_from", "model.init_from",
            sets=["checkpoint.resume_from=40", "model.init_from=s3://bucket/other/checkpoints"])


def test_resume_from_needs_resume_allowed():
    refused("checkpoint.resume_from", "never", sets=["checkpoint.resume_from=40", "checkpoint.resume=never"])


def test_export_weights_best_needs_a_validation_split():
    refused("data.validation_size", "export.weights", sets=["export.weights=best", "data.validation_size=0"])
    assert load_config(None, ["export.weights=best"]).export.weights == "best"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path, platform=False)
    assert cfg.checkpoint.uri and cfg.export.uri


def test_mixed_precision_names_its_16_bit_type():
    policies = {value: load_config(None, [f"train.mixed_precision={value}"]).train.dtype_policy
                for value in ("false", "true", "float16", "bfloat16")}
    assert policies == {"false": "float32", "true": "mixed_float16", "float16": "mixed_float16",
                        "bfloat16": "mixed_bfloat16"}
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=half"])


def test_the_lookahead_fixes_the_epochs_of_a_run():
    base = load_config(None, ["train.lr_schedule=constant"]).fingerprint()
    slow = load_config(None, ["train.lr_schedule=constant", "train.lookahead.enabled=true"]).fingerprint()
    assert "train.epochs" not in base and "train.epochs" in slow
    assert slow["train.lookahead"]["every_steps"] == 5
