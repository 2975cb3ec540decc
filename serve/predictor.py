"""The one path from decoded images to the model's answer, whatever the
protocol: the limit on images per request, the deadline, micro-batching, the batch-size
and version metrics, and the outputs as every protocol writes them. No Flask."""

from __future__ import annotations

import numpy as np

from common.images import BadInput
from serve import backends, deadline, metrics
from serve.backends import Loaded
from serve.batching import Batcher
from serve.settings import Settings


class Predictor:
    """The backend behind a batcher per input kind: pixels (uint8 [N, 32, 32, 3]), and encoded
    images for the model's predict_image_bytes, which never share a model call."""

    def __init__(self, settings: Settings, backend: backends.Backend | None = None):
        self.settings = settings
        self.backend = backend or _backend(settings)
        batching = settings.max_batch_size, settings.batch_timeout_ms, settings.max_queue
        self._pixels = Batcher(self.backend.predict, *batching, on_batch=metrics.BATCH_SIZE.observe)
        # Looked up at each call: a backend may take pixels only.
        self._encoded = Batcher(lambda encoded: self.backend.predict_bytes(encoded), *batching,
                                on_batch=metrics.BATCH_SIZE.observe)

    def predict(self, images: np.ndarray | list[bytes]) -> tuple[dict[str, np.ndarray], Loaded]:
        """Pixels, or encoded images -> (the outputs in name order, strings as text; the version that answered)."""
        if len(images) > self.settings.max_instances:
            raise BadInput(f"{len(images)} images in one request; at most {self.settings.max_instances}")
        batcher = self._pixels if isinstance(images, np.ndarray) else self._encoded
        deadline.check("the model call")
        remaining = deadline.remaining()  # None outside a request
        answered, loaded = batcher.predict(images, self.settings.request_timeout_s if remaining is None else remaining)
        metrics.MODEL_VERSION.set(loaded.version)
        # As TF Serving writes them: in name order, strings as text.
        outputs = {name: np.array([v.decode() for v in value], dtype=object) if value.dtype == object else value
                   for name, value in sorted(answered.items())}
        return outputs, loaded


def _backend(settings: Settings) -> backends.Backend:
    if settings.backend == "tfserving":
        from serve.tfserving import TFServing  # gRPC and TF Serving's protos: only for this backend

        return TFServing(settings)
    from serve.inprocess import InProcess  # TensorFlow: only for this backend

    return InProcess(settings)
