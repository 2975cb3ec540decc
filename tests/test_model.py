"""The networks: shapes, the width multiplier, and airbench's data-derived whitening."""

import tarfile
from pathlib import Path

import numpy as np
import pytest

from job import cifar10, model

REAL = Path(__file__).parent / "data" / "cifar10-real-small.tar.gz"


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    with tarfile.open(REAL) as tar:
        tar.extractall(tmp_path_factory.mktemp("real"), filter="data")
    (x, _), _ = cifar10.load_cifar10(str(next(tmp_path_factory.getbasetemp().glob("real*"))), Path("/nonexistent"))
    return x


def test_the_whitening_layer_decorrelates_real_pixel_patches(real_images):
    kernel, bias = model.whitening_weights(real_images)
    net = model.build("airbench", sample=real_images)
    whiten = net.get_layer("whiten")
    out = whiten(real_images.astype(np.float32) / 255).numpy().reshape(-1, 24)[:, :12]
    # Identity second moments on the data it was computed from (the raw
    # pixels' own are far from it), up to the eigenvalue floor.
    raw = np.concatenate([real_images[:, i:i + 31, j:j + 31] for i in (0, 1) for j in (0, 1)], axis=-1)
    raw = raw.reshape(-1, 12) / 255
    for moments, whitened in ((raw.T @ raw / len(raw), False), (out.T @ out / len(out), True)):
        off_diagonal = np.abs(moments - np.diag(np.diag(moments))).max()
        assert (off_diagonal < 1e-3) == whitened, off_diagonal
    second = out.T @ out / len(out)
    assert np.diag(second).max() < 1.001 and np.median(np.diag(second)) > 0.5
    np.testing.assert_array_equal(whiten.kernel.numpy(), kernel)
    trainable = {id(w) for w in net.trainable_weights}
    assert id(whiten.kernel) not in trainable and id(whiten.bias) in trainable


@pytest.mark.parametrize("name", ["simple_cnn", "resnet", "airbench"])
def test_width_scales_the_channels_and_every_model_takes_raw_pixels(name, real_images):
    narrow, wide = model.build(name, width=0.5, sample=real_images), model.build(name, sample=real_images)
    assert narrow.count_params() < wide.count_params() / 2
    logits = narrow(real_images[:4], training=False).numpy()
    assert logits.shape == (4, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()
