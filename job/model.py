"""The networks. Each takes raw uint8 pixels and scales them itself, so the
exported model serves exactly what training saw and clients send bytes as
they are."""

from __future__ import annotations

import keras
from keras import layers

NUM_CLASSES = 10


def build(name: str, mixed_precision: bool = False) -> keras.Model:
    previous = keras.config.dtype_policy()
    # Layers read the policy when they are built, so it is set only around
    # construction and the process-wide default is left as it was.
    keras.config.set_dtype_policy("mixed_float16" if mixed_precision else "float32")
    try:
        return _BUILDERS[name]()
    finally:
        keras.config.set_dtype_policy(previous)


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    images = keras.Input((32, 32, 3), dtype="uint8", name="images")
    return images, layers.Rescaling(1.0 / 255)(images)


def _logits(x) -> keras.KerasTensor:
    # float32 logits even under mixed precision: softmax and the loss need the range.
    return layers.Dense(NUM_CLASSES, dtype="float32", name="logits")(x)


def simple_cnn() -> keras.Model:
    """The seeds' network: conv32-pool-conv64-pool-conv64-flatten-dense64-dense10."""
    images, x = _inputs()
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(images, _logits(x), name="simple_cnn")


def resnet(depth: int = 20) -> keras.Model:
    """ResNet-20 (He et al. 2016, CIFAR variant): 91 % on CIFAR-10 at 41 MFLOPs
    and 0.27 M parameters, about a tenth of the FLOPs of ResNet-9-style nets
    for a few points less, which is the better trade on small GPUs and CPUs."""
    blocks = (depth - 2) // 6
    images, x = _inputs()
    x = _conv_bn(x, 16)
    x = layers.ReLU()(x)
    for stage, width in enumerate((16, 32, 64)):
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


_BUILDERS = {"simple_cnn": simple_cnn, "resnet": resnet}
