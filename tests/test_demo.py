"""`make demo`'s script, as a person runs it: real data when it can be had,
the synthetic set (saying so in one line) when the download fails, and an
error, not a silent fallback, when the user's own CIFAR_DATA__URI is wrong."""

import json
import runpy
import shutil
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "cifar10-real-small.tar.gz"
# Small enough for the suite; the recipe itself is measured in docs/benchmarks.md.
SMALL = {"CIFAR_TRAIN__EPOCHS": "1", "CIFAR_TRAIN__BATCH_SIZE": "50", "CIFAR_DATA__VALIDATION_SIZE": "50",
         "CIFAR_DATA__SYNTHETIC__TRAIN_SIZE": "400", "CIFAR_DATA__SYNTHETIC__TEST_SIZE": "100"}


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """Runs scripts/demo.py from a fresh checkout's point of view; returns its stdout."""
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for name, value in {**SMALL, "CIFAR_DATA__CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    # The fallback sets it in the environment its commands inherit. setenv first, so that monkeypatch
    # records it as absent and removes it after the test (delenv of an absent name records nothing,
    # and the fallback's value leaked into later tests of the same pytest worker).
    monkeypatch.setenv("CIFAR_DATA__SOURCE", "")
    monkeypatch.delenv("CIFAR_DATA__SOURCE")
    # Where the canonical archive would come from: a port nobody listens on, as offline.
    monkeypatch.setattr("job.cifar10.CANONICAL_URL", f"http://127.0.0.1:{free_port()}/cifar-10-binary.tar.gz")

    def run(capsys) -> str:
        runpy.run_path(str(ROOT / "scripts" / "demo.py"), run_name="__main__")
        return capsys.readouterr().out

    return run


@pytest.mark.slow
def test_offline_the_demo_says_so_once_and_still_ends_in_a_prediction(demo, capsys):
    out = demo(capsys)
    assert out.count("could not be downloaded") == 1 and "training on the synthetic set instead" in out
    accuracy = json.loads(next(line for line in out.splitlines() if line.startswith('{"accuracy"')))
    assert accuracy["examples"] == 100
    answer = json.loads(out[out.index("{\n"):out.index("\n}") + 2])
    assert answer["predictions"][0]["label"] and answer["model_version"] == 1
    assert "demo: done in" in out


@pytest.mark.slow
def test_with_a_local_copy_the_demo_trains_on_it_and_sends_a_real_test_image(demo, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR_DATA__URI", str(REAL))
    out = demo(capsys)
    assert "could not be downloaded" not in out and "synthetic" not in out
    assert json.loads(next(line for line in out.splitlines() if line.startswith('{"accuracy"')))["examples"] == 200
    # The fixture's first held-out image is an automobile (record 0 of test_batch.bin, label 1).
    assert "training never saw: an automobile" in out
    assert json.loads(out[out.index("{\n"):out.index("\n}") + 2])["predictions"]


def test_a_wrong_cifar_data_uri_is_an_error_not_a_fallback(demo, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR_DATA__URI", str(tmp_path / "no-such.tar.gz"))
    with pytest.raises(SystemExit, match="no-such.tar.gz"):
        demo(capsys)
    assert "synthetic" not in capsys.readouterr().out
