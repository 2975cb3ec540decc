import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def small_overrides(tmp_path, **extra) -> list[str]:
    """A run small enough for a unit test: a few seconds on two cores."""
    values = {
        "data.synthetic.train_size": 1200,
        "data.synthetic.test_size": 300,
        "data.validation_size": 200,
        "train.batch_size": 32,
        "train.epochs": 2,
        "checkpoint.every_steps": 10,
        "checkpoint.uri": str(tmp_path / "ckpt"),
        "export.uri": str(tmp_path / "export"),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def run_job():
    """Train in-process; returns (Result, console output)."""
    from job import train
    from job.config import load_config
    from job.report import Console

    def run(overrides: list[str]):
        out = io.StringIO()
        result = train.run(load_config(None, overrides), Console("text", stream=out))
        return result, out.getvalue()

    return run
