"""The development split of real CIFAR-10 the recipes are measured on
(`../shared/data`, beside a development checkout; a user's clone has no such
folder, and these tests skip saying so)."""

from pathlib import Path

import numpy as np
import pytest

from job import sources
from job.config import load_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-dev-binary.tar.gz"
pytestmark = pytest.mark.skipif(not SHARED.is_file(), reason=f"{SHARED} is not here: only the project's own "
                                "machines carry the development split")


@pytest.mark.slow
def test_the_development_split_is_the_data_the_recorded_figures_name():
    splits = sources.load(load_config(None, ["data.source=cifar10", f"data.uri={SHARED}",
                                             "data.validation_size=1000"]))
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (39_000, 1_000, 10_000)
    # docs/benchmarks.md's rows print this checksum's first 12 hex digits.
    assert splits.checksum.startswith("sha256:0662220f67a3")
    # Real photographs, every class present in the held-out set: not noise, not one class.
    counts = np.bincount(splits.y_test, minlength=10)
    assert counts.min() > 900 and counts.max() < 1100
    assert 100 < splits.x_test.mean() < 140 and splits.x_test.std() > 50
