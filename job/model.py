"""The networks. Each takes raw uint8 pixels and scales them itself, so the
exported model serves exactly what training saw and clients send bytes as
they are."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

NUM_CLASSES = 10

# Bumped when a network's variables change, so that a checkpoint of an
# earlier revision is refused with a message instead of failing inside
# TensorFlow's restore. Checkpoints written before revisions were recorded
# count as revision 1. airbench 2: BatchNorm and its fast shift became
# ShiftNorm (other variables).
REVISIONS = {"simple_cnn": 1, "resnet": 1, "airbench": 2}


def build(name: str, policy: str = "float32", width: float = 1.0, sample: np.ndarray | None = None,
          seed: int | None = None, tta: str = "none") -> keras.Model:
    """`policy` is Keras' dtype policy (float32, mixed_float16,
    mixed_bfloat16); `width` multiplies every layer's channels; `sample`
    (uint8 training images) is what data-dependent initialisation reads
    (airbench's whitening). `seed` makes the initial weights a function of it
    alone; None, for a model rebuilt only to restore weights into, draws
    from whatever state there is. `tta` (see TestTimeAugmentation) changes
    what inference computes, not the weights."""
    if seed is not None:
        # Keras' initialisers draw their seeds from Python's global `random`
        # (and unseeded keras.random calls from a global generator) when
        # constructed. Seeding here, with nothing run in between, keeps a
        # library that consumes that state earlier in the run (boto3,
        # fetching the data) out of the weights.
        keras.utils.set_random_seed(seed)
    previous = keras.config.dtype_policy()
    # Layers read the policy when they are built, so it is set only around
    # construction and the process-wide default is left as it was.
    keras.config.set_dtype_policy(policy)
    try:
        net = airbench(width, sample) if name == "airbench" else _BUILDERS[name](width)
        return net if tta == "none" else TestTimeAugmentation(net, tta)
    finally:
        keras.config.set_dtype_policy(previous)


def float32_twin(net: keras.Model, name: str, width: float, tta: str) -> keras.Model:
    """The same network computing in float32, holding `net`'s weights: what
    is evaluated and exported after mixed-precision training, so that the
    served model runs at full speed on any CPU (float16 and bfloat16
    convolutions do only on some) and loses nothing to rounding."""
    twin = build(name, "float32", width, tta=tta)
    twin.set_weights(net.get_weights())
    return twin


class TestTimeAugmentation(keras.Model):
    """Inference that averages the logits of flipped (`flip`) and also of
    one-pixel-shifted (`flip_translate`) copies of each image, as airbench
    does; training steps see the network alone. It is the model's own call,
    so validation, the test figure and the exported SavedModel all count it."""

    def __init__(self, net: keras.Model, level: str, **kwargs):
        super().__init__(name=f"{net.name}_tta", **kwargs)
        self.net, self.level = net, level

    def _mirrored(self, images):
        both = self.net(keras.ops.concatenate([images, keras.ops.flip(images, axis=2)]), training=False)
        plain, flipped = keras.ops.split(both, 2)
        return 0.5 * (plain + flipped)

    def call(self, images, training=False):
        if training:
            return self.net(images, training=True)
        logits = self._mirrored(images)
        if self.level == "flip_translate":
            # Up-left and down-right by one pixel, edges reflected (airbench's tta_level 2).
            padded = keras.ops.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")
            shifted = keras.ops.concatenate([padded[:, :32, :32], padded[:, 2:, 2:]])
            up_left, down_right = keras.ops.split(self._mirrored(shifted), 2)
            logits = 0.5 * logits + 0.25 * (up_left + down_right)
        return logits


def _scaled(channels: int, width: float) -> int:
    return max(8, round(channels * width))


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    images = keras.Input((32, 32, 3), dtype="uint8", name="images")
    return images, layers.Rescaling(1.0 / 255)(images)


def _logits(x) -> keras.KerasTensor:
    # float32 logits even under mixed precision: softmax and the loss need the range.
    return layers.Dense(NUM_CLASSES, dtype="float32", name="logits")(x)


def simple_cnn(width: float = 1.0) -> keras.Model:
    """The seeds' network: conv32-pool-conv64-pool-conv64-flatten-dense64-dense10."""
    images, x = _inputs()
    x = layers.Conv2D(_scaled(32, width), 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(_scaled(64, width), 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(_scaled(64, width), 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(_scaled(64, width), activation="relu")(x)
    return keras.Model(images, _logits(x), name="simple_cnn")


def resnet(width_multiplier: float = 1.0, depth: int = 20) -> keras.Model:
    """ResNet-20 (He et al. 2016, CIFAR variant): 41 MFLOPs and 0.27 M
    parameters, a tenth of the FLOPs of ResNet-9-style nets."""
    blocks = (depth - 2) // 6
    images, x = _inputs()
    x = _conv_bn(x, _scaled(16, width_multiplier))
    x = layers.ReLU()(x)
    for stage, width in enumerate(_scaled(w, width_multiplier) for w in (16, 32, 64)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.ReLU()(_conv_bn(x, width, stride))
            y = _conv_bn(y, width)
            if stride != 1:
                shortcut = _conv_bn(x, width, stride, kernel=1)
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, _logits(x), name=f"resnet{depth}")


def _conv_bn(x, width: int, stride: int = 1, kernel: int = 3):
    x = layers.Conv2D(width, kernel, strides=stride, padding="same", use_bias=False, kernel_initializer="he_normal")(x)
    return layers.BatchNormalization()(x)


class Whitening(layers.Layer):
    """A fixed 2x2 convolution that whitens pixel patches, with a learnt bias.

    Its kernel comes from the data (the eigenvectors of the covariance of
    2x2 patches, each scaled to unit variance, and their negatives), so the
    first layer starts out decorrelated instead of learning it: the single
    largest saving in airbench's recipe. Mean and scale of the pixels are
    folded into kernel and bias, so the network still takes raw pixels.
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self._kernel, self._bias = kernel, bias

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=self._kernel.shape, initializer=keras.initializers.Constant(self._kernel),
                                      trainable=False, name="kernel")
        self.bias = self.add_weight(shape=self._bias.shape, initializer=keras.initializers.Constant(self._bias),
                                    name="bias")

    def call(self, x):
        y = keras.ops.conv(x, keras.ops.cast(self.kernel, x.dtype), padding="valid")
        return y + keras.ops.cast(self.bias, x.dtype)


def whitening_weights(sample: np.ndarray, eps: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [2,2,3,24], bias [24]) whitening the 2x2 patches of uint8 `sample`."""
    x = sample.astype(np.float32) / 255
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    covariance = np.zeros((12, 12))
    for chunk in np.array_split((x - mean) / std, max(1, len(x) // 500)):
        # (row, col, channel) order, as a [2,2,3] kernel flattens
        patches = np.concatenate([chunk[:, i:i + 31, j:j + 31, :] for i in (0, 1) for j in (0, 1)], axis=-1)
        patches = patches.reshape(-1, 12)
        covariance += patches.T.astype(np.float64) @ patches
    eigenvalues, eigenvectors = np.linalg.eigh(covariance / (len(x) * 31 * 31))
    w = eigenvectors / np.sqrt(eigenvalues + eps)  # column k: the k-th whitening filter
    w = np.concatenate([w, -w], axis=1).reshape(2, 2, 3, 24)
    # Act on raw [0, 1] pixels: W((x - mean) / std) = (W / std) x - W(mean / std).
    kernel = w / std[None, None, :, None]
    bias = -np.einsum("ijco,c->o", w, mean / std)
    return kernel.astype(np.float32), bias.astype(np.float32)


class PartialIdentity(keras.initializers.Initializer):
    """Identity for the first input-many filters, PyTorch's default for the
    rest: a conv group starts close to passing its input through (airbench)."""

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        bound = 1 / np.sqrt(kh * kw * cin)
        w = keras.random.uniform(shape, -bound, bound, dtype=dtype)
        n = min(cin, cout)
        eye = np.zeros(shape, np.float32)
        eye[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1
        keep = np.ones(shape, np.float32)
        keep[..., :n] = 0
        return w * keep + eye


class ShiftNorm(layers.Layer):
    """airbench's BatchNorm: no scale, and a shift that learns `rate` times
    faster than other weights under SGD (its `bias_scaler`) at the same
    weight decay. The shift is stored as b / sqrt(rate) and multiplied back,
    which under SGD with momentum is exactly a `rate`-fold learning rate for
    b, and under decoupled weight decay the same decay; so the optimizer
    needs no per-variable learning rates. Running statistics keep `momentum`
    of themselves each step (PyTorch's 1 - momentum).

    One fused kernel (oneDNN's on a CPU) normalises and shifts, forward and
    backward: Keras' BatchNormalization plus a separate bias cost the fast
    recipe's step 30 % more (docs/benchmarks.md)."""

    def __init__(self, rate: float = 64.0, momentum: float = 0.6, epsilon: float = 1.001e-5, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.momentum, self.epsilon = rate, momentum, epsilon

    def build(self, input_shape):
        channels = (input_shape[-1],)
        # float32 whatever the compute dtype: the fused kernel takes its
        # statistics and shift in float32, as Keras' BatchNormalization keeps them.
        self.bias = self.add_weight(shape=channels, initializer="zeros", name="bias", autocast=False)
        self.moving_mean = self.add_weight(shape=channels, initializer="zeros", trainable=False,
                                           name="moving_mean", autocast=False)
        self.moving_variance = self.add_weight(shape=channels, initializer="ones", trainable=False,
                                               name="moving_variance", autocast=False)

    def call(self, x, training=False):
        training = bool(training)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.ones_like(self.moving_mean), self.bias * self.rate ** 0.5, self.moving_mean,
            self.moving_variance, epsilon=self.epsilon, is_training=training,
            exponential_avg_factor=1 - self.momentum if training else 1.0)
        if training:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "momentum": self.momentum, "epsilon": self.epsilon}


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@tf.function(jit_compile=True)
def _gelu_forward(x):
    return x * tf.cast(0.5 * tf.math.erfc(-tf.cast(x, tf.float32) * _SQRT_HALF), x.dtype)


@tf.function(jit_compile=True)
def _gelu_backward(x, dy):
    x32 = tf.cast(x, tf.float32)
    slope = 0.5 * tf.math.erfc(-x32 * _SQRT_HALF) + x32 * tf.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    return tf.cast(tf.cast(dy, tf.float32) * slope, x.dtype)


@tf.custom_gradient
def _fused_gelu(x):
    return _gelu_forward(x), lambda dy: _gelu_backward(x, dy)


class GELU(layers.Layer):
    """The exact GELU. In training its forward and its backward pass are one
    XLA-fused kernel each: TensorFlow's own is a chain of elementwise ops,
    each a pass over memory, and they took a third of the fast recipe's step
    on a CPU (docs/benchmarks.md). Inference is tf.nn.gelu, so an exported
    model needs no XLA where it is served."""

    def call(self, x, training=False):
        return _fused_gelu(x) if training else tf.nn.gelu(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def airbench(width: float = 1.0, sample: np.ndarray | None = None) -> keras.Model:
    """airbench94's network (Keller Jordan, 2024), in Keras: a whitening
    layer, three conv-pool-BN-GELU groups (64, 256, 256 channels times
    `width`), a global max-pool and a scaled linear head. `sample` is the
    training images the whitening layer is computed from; without it (a
    model rebuilt to restore a checkpoint into) the kernel starts at zero."""
    images = keras.Input((32, 32, 3), dtype="uint8", name="images")
    x = layers.Rescaling(1.0 / 255)(images)
    kernel, bias = whitening_weights(sample) if sample is not None else (np.zeros((2, 2, 3, 24), np.float32),
                                                                          np.zeros(24, np.float32))
    x = GELU()(Whitening(kernel, bias, name="whiten")(x))
    for block, channels in enumerate((64, 256, 256), start=1):
        channels = _scaled(channels, width)
        for conv in (1, 2):
            x = layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity(),
                              name=f"block{block}_conv{conv}")(x)
            if conv == 1:
                x = layers.MaxPooling2D()(x)
            x = GELU()(ShiftNorm()(x))
    x = layers.GlobalMaxPooling2D()(x)
    # PyTorch's default Linear initialisation, as airbench has it: uniform within 1/sqrt(fan_in).
    head_init = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")
    x = layers.Dense(NUM_CLASSES, use_bias=False, dtype="float32", kernel_initializer=head_init, name="logits")(x)
    # A small logit scale lets the head train at the body's large learning rate.
    return keras.Model(images, layers.Rescaling(1 / 9, dtype="float32")(x), name="airbench")


_BUILDERS = {"simple_cnn": simple_cnn, "resnet": resnet}
