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


def test_flip_tta_answers_an_image_and_its_mirror_alike(real_images):
    net = model.build("airbench", width=0.25, sample=real_images, seed=0, tta="flip")
    x = real_images[:8]
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    np.testing.assert_allclose(net(x, training=False), net(mirrored, training=False), rtol=0, atol=1e-5)
    # The network alone does not: the averaging is what makes it so.
    assert not np.allclose(net.net(x, training=False), net.net(mirrored, training=False), atol=1e-3)


def test_flip_translate_tta_averages_six_views_and_training_sees_the_network_alone(real_images):
    net = model.build("airbench", width=0.25, sample=real_images, seed=0, tta="flip_translate")
    x = real_images[:4]

    def both_ways(v):
        return 0.5 * (net.net(v, training=False).numpy() + net.net(np.ascontiguousarray(v[:, :, ::-1]),
                                                                    training=False).numpy())

    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    expected = 0.5 * both_ways(x) + 0.25 * (both_ways(padded[:, :32, :32]) + both_ways(padded[:, 2:, 2:]))
    np.testing.assert_allclose(net(x, training=False), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(net(x, training=True), net.net(x, training=True))


def test_shift_norm_normalises_as_keras_batch_norm_and_its_shift_moves_64_times_as_far():
    import keras
    import tensorflow as tf

    x = tf.random.stateless_normal((8, 8, 8, 3), seed=(1, 2)) * 3 + 5
    fused, keras_bn = model.ShiftNorm(), keras.layers.BatchNormalization(momentum=0.6, epsilon=1.001e-5, center=False,
                                                                          scale=False)
    for _ in range(3):
        np.testing.assert_allclose(fused(x, training=True), keras_bn(x, training=True), atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean, keras_bn.moving_mean, rtol=1e-5)
    # The fused kernel keeps the unbiased variance (n / (n - 1), n = 512 here), as PyTorch does.
    np.testing.assert_allclose(fused.moving_variance, keras_bn.moving_variance, rtol=3e-3)
    np.testing.assert_allclose(fused(x, training=False), keras_bn(x, training=False), rtol=3e-3, atol=3e-3)

    with tf.GradientTape() as tape:
        total = tf.reduce_sum(fused(x, training=True))
    shift = 8 * 8 * 8  # d(total)/d(shift): each channel's shift adds to 512 outputs
    keras.optimizers.SGD(0.01).apply(tape.gradient(total, [fused.bias]), [fused.bias])
    np.testing.assert_allclose(fused.bias * 8, [-0.64 * shift] * 3, rtol=1e-5)  # a plain bias: -0.01 * 512
    before = fused.bias.numpy()
    keras.optimizers.SGD(0.01, weight_decay=0.5).apply([tf.zeros(3)], [fused.bias])
    np.testing.assert_allclose(fused.bias, before * (1 - 0.01 * 0.5), rtol=1e-6)


def test_the_fused_gelu_trains_as_tensorflows_exact_gelu():
    import tensorflow as tf

    x = tf.random.stateless_normal((4, 5, 5, 8), seed=(3, 4)) * 3
    gelu = model.GELU()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        fused, reference = gelu(x, training=True), tf.nn.gelu(x)
        weights = tf.random.stateless_normal(x.shape, seed=(5, 6))
        fused_loss, reference_loss = tf.reduce_sum(fused * weights), tf.reduce_sum(reference * weights)
    np.testing.assert_allclose(fused, reference, atol=1e-6)
    np.testing.assert_array_equal(gelu(x, training=False), reference)
    np.testing.assert_allclose(tape.gradient(fused_loss, x), tape.gradient(reference_loss, x), atol=1e-5)


def test_the_float32_twin_holds_the_mixed_precision_weights_and_computes_in_float32(real_images):
    trained = model.build("airbench", "mixed_bfloat16", width=0.25, sample=real_images, seed=0, tta="flip")
    twin = model.float32_twin(trained, "airbench", 0.25, "flip")
    assert {layer.compute_dtype for layer in twin.net.layers} == {"float32"}
    assert "bfloat16" in {layer.compute_dtype for layer in trained.net.layers}
    for a, b in zip(trained.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = real_images[:16]
    # bfloat16 keeps 8 bits of mantissa: close, not equal.
    np.testing.assert_allclose(twin(x, training=False), trained(x, training=False), atol=0.05)
