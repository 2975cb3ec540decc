"""Rollouts: every export records a probe batch and its answers, which the
service checks a version against before serving it."""

import numpy as np
import tensorflow as tf

from job import export, model

PROBE = np.random.default_rng(3).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)


def test_every_export_records_its_probe_batch_and_the_answers_to_it(tmp_path):
    version = export.export(model.build("simple_cnn"), str(tmp_path), "cifar10", {}, PROBE)[1]
    extra = tmp_path / "cifar10" / "1" / "assets.extra"
    np.testing.assert_array_equal(np.load(extra / "probe_images.npy"), PROBE)
    own = tf.saved_model.load(version).signatures["serving_default"](images=tf.constant(PROBE))
    with np.load(extra / "probe_outputs.npz", allow_pickle=False) as record:
        assert set(record) == set(own)
        np.testing.assert_allclose(record["probabilities"], own["probabilities"].numpy(), atol=1e-6)
