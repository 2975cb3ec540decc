"""Ask an exported model about one image, the way a TF Serving client would:
through its `serving_default` signature with raw uint8 pixels, and through
`predict_image_bytes` with the same image as PNG."""

import io
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from job.data import synthetic  # noqa: E402
from job.evaluate import resolve_version  # noqa: E402

version_dir = resolve_version(sys.argv[1])
model = tf.saved_model.load(version_dir)
labels = open(os.path.join(version_dir, "assets", "labels.txt")).read().split()
_, (images, truth) = synthetic(1, 1)

probs = model.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()[0]
png = io.BytesIO()
Image.fromarray(images[0]).save(png, format="PNG")
by_bytes = model.signatures["predict_image_bytes"]
from_png = by_bytes(image_bytes=tf.constant([png.getvalue()]))["probabilities"].numpy()[0]

top = int(np.argmax(probs))
print(json.dumps({"model": version_dir, "true_label": labels[truth[0]], "label": labels[top], "class_id": top,
                  "probability": round(float(probs[top]), 4), "png_label": labels[int(np.argmax(from_png))]}))
