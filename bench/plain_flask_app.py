"""The baseline for bench/serve_bench.py: the simplest honest Flask app.

It loads the SavedModel once at import and runs its `serving_default`
signature once per request: no batching, no validation layer, no metrics,
no logging. It answers the same TF Serving REST route with the same answer
shape as the service, so the benchmark sends both the identical request.
Run under gunicorn with the service's worker settings (gthread, its default
worker and thread counts), so only the app differs:

    PLAIN_MODEL_DIR=<base>/<version> gunicorn -k gthread -w 2 --threads 16 bench.plain_flask_app:app
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flask import Flask, Response, request  # noqa: E402

LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

signature = tf.saved_model.load(os.environ["PLAIN_MODEL_DIR"]).signatures["serving_default"]
signature(images=tf.zeros([1, 32, 32, 3], tf.uint8))  # trace/warm up before the first request

app = Flask(__name__)


@app.post("/v1/models/cifar10:predict")
def predict():
    try:
        images = np.asarray(json.loads(request.get_data())["instances"], dtype=np.uint8)
    except (ValueError, KeyError, TypeError, OverflowError):
        return Response('{"error": "expected {\\"instances\\": [32x32x3 nested lists]}"}', 400,
                        mimetype="application/json")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        return Response('{"error": "each instance must be 32x32x3"}', 400, mimetype="application/json")
    probabilities = signature(images=tf.constant(images))["probabilities"].numpy()
    predictions = [{"label": LABELS[int(np.argmax(p))], "class_id": int(np.argmax(p)),
                    "probabilities": p.tolist()} for p in probabilities]
    return Response(json.dumps({"predictions": predictions}), mimetype="application/json")
