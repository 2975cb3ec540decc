"""Which images of a CIFAR-10 copy were decoded from a JPEG, and what JPEG
costs a trained model on them. Usage:

    .venv/bin/python bench/jpeg_probe.py --data-uri PATH [--model EXPORT_VERSION_DIR] [--quality Q]

An image once decoded from a JPEG of quality Q comes back almost unchanged
from another round trip at Q; an original loses detail. So the mean absolute
change of one round trip sorts a copy's images into the two kinds. With
--model, the exported model classifies the test images that are originals,
as they are and after one round trip at Q: the same images both times, so
the difference is JPEG's alone.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, too

import numpy as np
from PIL import Image

from common import layout
from job import cifar10

# Round-trip change, in 255ths, below which an image counts as already JPEG-decoded.
ALREADY_JPEG = 2.0


def round_trips(images: np.ndarray, quality: int) -> np.ndarray:
    """Each image encoded as a JPEG at `quality` and decoded again."""
    def one(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(buffer))
    return np.stack([one(image) for image in images])


def change(images: np.ndarray, trips: np.ndarray) -> np.ndarray:
    """Each image's mean absolute change, in 255ths, from its round trip."""
    return np.abs(trips.astype(np.int16) - images).mean(axis=(1, 2, 3))


def right(export_dir: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether the exported model's serving signature classifies each image as labelled."""
    import tensorflow as tf

    from job import data

    predict = tf.saved_model.load(export_dir).signatures[layout.SIGNATURE]
    return np.concatenate([predict(**{layout.INPUT: x})[layout.CLASS_ID].numpy().ravel() == y.numpy()
                           for x, y in data.eval_batches(images, labels)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-uri", required=True, help="a CIFAR-10 archive or directory (binary or python layout)")
    ap.add_argument("--model", help="an exported SavedModel version directory")
    ap.add_argument("--quality", type=int, default=75)
    args = ap.parse_args()
    (x_train, _), (x_test, y_test) = cifar10.read(Path(args.data_uri))
    q = args.quality
    test_trips = round_trips(x_test, q)
    test_change = change(x_test, test_trips)
    for name, c in (("train", change(x_train, round_trips(x_train, q))), ("test", test_change)):
        print(f"{name}: {np.mean(c <= ALREADY_JPEG):.1%} of {len(c)} images already JPEG-decoded at quality {q} "
              f"(round trip changes them by <= {ALREADY_JPEG}/255; median {np.median(c):.2f}), "
              f"{np.sum(c > ALREADY_JPEG)} originals (median change {np.median(c[c > ALREADY_JPEG]):.2f}/255)")
    if args.model:
        originals = test_change > ALREADY_JPEG
        kept, compressed, truth = x_test[originals], test_trips[originals], y_test[originals]
        as_is, after = right(args.model, kept, truth), right(args.model, compressed, truth)
        print(f"{args.model} on the {len(kept)} original test images: accuracy {as_is.mean():.4f} as they are, "
              f"{after.mean():.4f} after one JPEG round trip at quality {q} "
              f"(mean change {test_change[originals].mean():.2f}/255); "
              f"right only as they are: {np.sum(as_is & ~after)}, right only after: {np.sum(~as_is & after)}")


if __name__ == "__main__":
    main()
