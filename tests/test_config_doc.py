"""The config documents itself: every field's meaning lives in job/config.py,
and the table in docs/training.md and `check-config --explain` are rendered from it.

Fast and TensorFlow-free.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from job import config_doc
from job.config import Config, Section

REPO = Path(__file__).resolve().parents[1]


def test_every_leaf_field_says_what_it_means():
    missing = [
        f"{model.__name__}.{name}"
        for model in (Config, *Section.__subclasses__())
        for name, field in model.model_fields.items()
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
        and not (field.description or "").strip()
    ]
    assert not missing, f"give these a Field(description=...): {', '.join(missing)}"


def test_the_docs_config_table_is_the_generated_one():
    text = (REPO / config_doc.DEFAULT_TARGET).read_text()
    assert text == config_doc.rewrite(text), (
        f"{config_doc.DEFAULT_TARGET}'s config table differs from the models in job/config.py; regenerate it "
        f"with `.venv/bin/python -m job.config_doc` (edit descriptions in job/config.py, not in the docs)")


def test_the_table_has_one_row_per_key_and_escapes_pipes():
    rows = config_doc.markdown().splitlines()[2:]
    keys = [e.key for e, _ in config_doc.entries()]
    assert len(rows) == len(keys) and "train.batch_size" in keys and "train.lr_schedule.warmup_epochs" in keys
    # Every row has exactly the table's four cells: no unescaped | inside a cell.
    assert all(row.replace("\\|", "").count("|") == 5 for row in rows), rows


def test_rewrite_replaces_only_what_lies_between_the_markers():
    text = f"intro\n{config_doc.START}\n| stale |\n{config_doc.END}\n\nafter\n"
    out = config_doc.rewrite(text)
    assert out == f"intro\n{config_doc.START}\n\n{config_doc.markdown()}\n{config_doc.END}\n\nafter\n"
    assert config_doc.rewrite(out) == out
    with pytest.raises(ValueError, match="markers"):
        config_doc.rewrite("no table here\n")


def test_check_config_explain_prints_every_key_resolved_with_type_default_and_meaning(tmp_path):
    (tmp_path / "job.yaml").write_text("train:\n  lr_schedule: cosine\n  epochs: 5\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CIFAR_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               CIFAR_TRAIN__EPOCHS="4")
    proc = subprocess.run(
        [sys.executable, "-m", "job", "check-config", "--explain", "--config", "job.yaml",
         "--set", "train.batch_size=32", "--set", "train.lr_schedule.warmup_epochs=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    blocks = {}
    for block in proc.stdout.strip().split("\n\n"):
        head, kind, *meaning = block.splitlines()
        key, _, value = head.partition(": ")
        blocks[key] = (value, kind.strip(), " ".join(line.strip() for line in meaning))
    assert list(blocks) == [e.key + (f" (with {e.schedule})" if e.schedule else "") for e, _ in config_doc.entries()]

    # The value as the file, environment and --set resolve it, beside the default.
    assert blocks["train.batch_size"][:2] == ("32", "int >= 1; default 64")
    assert blocks["train.epochs"][0] == "4"
    assert blocks["train.lr_schedule"][0] == "cosine"
    assert blocks["train.lr_schedule.warmup_epochs (with cosine)"][0] == "1.0"
    assert blocks["train.lr_schedule.decay_rate (with exponential)"][0] == "unused, train.lr_schedule is cosine"
    assert blocks["data.uri"][:2] == ("null", "str or null; default null")
    assert blocks["export.model_name"][0] == "cifar10"
    assert blocks["data.source"][1] == "synthetic | cifar10 | folder; default synthetic"
    assert blocks["train.jit_compile"][2].startswith("Compile the training and evaluation steps with XLA")
    assert all(meaning for _, _, meaning in blocks.values())
