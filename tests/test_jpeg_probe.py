"""bench/jpeg_probe.py's sorting of images into JPEG-decoded ones and
originals, on the real images the tests carry: the first records of the
development split, which are among its bit-exact tenth (the probe finds the
held-out originals at its start)."""

import importlib.util
import tarfile
from pathlib import Path

import numpy as np

from job import cifar10

spec = importlib.util.spec_from_file_location("jpeg_probe",
                                              Path(__file__).resolve().parents[1] / "bench" / "jpeg_probe.py")
jpeg_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(jpeg_probe)

REAL = Path(__file__).parent / "data" / "cifar10-real-small.tar.gz"


def test_a_decoded_jpeg_survives_another_round_trip_and_an_original_does_not(tmp_path):
    with tarfile.open(REAL) as tar:
        tar.extractall(tmp_path, filter="data")
    (_, _), (images, _) = cifar10.read(tmp_path)
    decoded = jpeg_probe.round_trips(images, 75)
    assert np.all(jpeg_probe.change(images, decoded) > jpeg_probe.ALREADY_JPEG)
    # Nearly all: clipping and rounding leave a few that move further.
    assert np.mean(jpeg_probe.change(decoded, jpeg_probe.round_trips(decoded, 75)) <= jpeg_probe.ALREADY_JPEG) > 0.95
    # At another quality the round trip is no longer idempotent: the probe needs the copy's own.
    assert np.median(jpeg_probe.change(decoded, jpeg_probe.round_trips(decoded, 90))) > jpeg_probe.ALREADY_JPEG / 4
