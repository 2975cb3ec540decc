"""The TF Serving backend: predictions forwarded over gRPC to a TF Serving
(or anything speaking its PredictionService/ModelService) at
`tfserving_address`; readiness from its GetModelStatus. Its messages are
serve/protos/'s, TF Serving's own without TensorFlow: a process of this
backend never imports TensorFlow (tests/test_forwarder.py)."""

from __future__ import annotations

import logging
import math
import threading

import grpc
import numpy as np

from common import layout
from common.layout import BYTES_INPUT, BYTES_SIGNATURE, INPUT, SIGNATURE
from serve import store
from serve.backends import Loaded, Unavailable, UpstreamError
from serve.batching import request_ids
from serve.protos.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from serve.settings import Settings

log = logging.getLogger("serve")

OUTPUT = layout.PROBABILITIES
# gRPC refuses to *receive* messages over 4 MB by default (sending is
# unbounded). TF Serving lifts its own receive limit to 2 GB, so a batch of
# ~1400+ images (3 KB each) gets through; we lift ours for large answers, and
# bound what we send at the same 64 MiB (~21k images) rather than not at all.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DT_UINT8, DT_FLOAT, DT_STRING, DT_INT64 = 4, 1, 7, 9  # tensorflow/core/framework/types.proto
# How each output dtype is read: from tensor_content as this numpy dtype, or else from this repeated field.
READ = {DT_FLOAT: ("<f4", "float_val"), DT_INT64: ("<i8", "int64_val"), DT_STRING: (object, "string_val")}

# gRPC servers begin refusing calls whose metadata exceeds 8 KiB (grpc.max_metadata_size,
# sized as HTTP/2 sizes headers: name + value + 32 bytes an entry); a batch's
# request ids stop at half that, since a large batch of long ids could pass it.
MAX_ID_BYTES = 4096

# What each gRPC failure means for our clients: TF Serving down or the model
# not loaded (yet) is a 503 worth retrying; too slow is a 504; anything else
# (a rejected input, a crash inside the model) is a bad gateway, 502.
HTTP_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.NOT_FOUND: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
}


class TFServing:
    def __init__(self, settings: Settings):
        self.name = settings.name
        self.model_uri = settings.model_uri  # where TF Serving's versions are published, if the service is told
        self._cards: dict[int, dict | None] = {}  # version -> its card: each read from the store once
        self.address = settings.tfserving_address
        self.timeout = settings.tfserving_timeout_s
        self.poll_seconds = settings.poll_seconds
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self._channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._predict, self._metadata = prediction.Predict, prediction.GetModelMetadata
        self._status = model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus
        self._stop = threading.Event()
        # The first poll happens on the thread too, so a TF Serving that is
        # still starting (or absent) never delays or breaks our own start.
        self._thread = threading.Thread(target=self._watch, name="tfserving-watch", daemon=True)
        self._thread.start()

    def _error(self, exc: grpc.RpcError, what: str) -> UpstreamError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        message = f"TF Serving at {self.address}: {what} failed with {code.name}"
        if details:
            message += f": {details.splitlines()[0][:200]}"  # its first line only: no upstream traces
        return UpstreamError(message, HTTP_STATUS.get(code, 502))

    @staticmethod
    def _request_ids() -> tuple[tuple[str, str], ...]:
        """The ids of the requests behind this call as gRPC metadata, so that what
        TF Serving's side sees (a proxy, a tracing interceptor) can be matched
        with our log. A batch holds several requests: one `x-request-id`
        entry each, as gRPC lets a key repeat, rather than one joined value, since
        a client's id may hold any separator. Past MAX_ID_BYTES the rest are left
        out: a diagnostic aid must not fail the call. None for the status poll,
        which no request asked for."""
        entries, size = [], 0
        for request_id in dict.fromkeys(request_ids.get()):
            size += len("x-request-id") + len(request_id) + 32
            if size > MAX_ID_BYTES:
                break
            entries.append(("x-request-id", request_id))
        return tuple(entries)

    def predict(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], Loaded]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=self.name, signature_name=SIGNATURE))
        # The TensorProto by hand: the raw bytes, as tf.make_tensor_proto would
        # write them, without its per-call conversion and checks.
        tensor = request.inputs[INPUT]
        tensor.dtype = DT_UINT8
        for size in images.shape:
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = images.tobytes()
        return self._call(request, len(images))

    def predict_bytes(self, encoded: list[bytes]) -> tuple[dict[str, np.ndarray], Loaded]:
        """Encoded images through the model's predict_image_bytes signature, decoded by TF Serving."""
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=self.name, signature_name=BYTES_SIGNATURE))
        tensor = request.inputs[BYTES_INPUT]
        tensor.dtype = DT_STRING
        tensor.tensor_shape.dim.add(size=len(encoded))
        tensor.string_val.extend(encoded)
        return self._call(request, len(encoded))

    def signature_defs(self, version: int) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=self.name), metadata_field=["signature_def"])
        request.model_spec.version.value = version
        try:
            response = self._metadata(request, timeout=self.timeout, metadata=self._request_ids())
        except grpc.RpcError as exc:
            raise self._error(exc, "GetModelMetadata") from None
        defs = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(defs):
            raise UpstreamError(f"TF Serving at {self.address} answered metadata without a SignatureDefMap", 502)
        return dict(defs.signature_def)

    def card(self, version: int) -> dict:
        """TF Serving does not hand out a version's files: the card is read from the model store that
        SERVE_MODEL_URI names, the one TF Serving's versions are published to (or mirrored from)."""
        if not self.model_uri:
            raise LookupError("the TF Serving backend reads model cards from the model store: set "
                              "SERVE_MODEL_URI to the model base TF Serving's versions come from")
        cards = self._cards  # request threads may replace it meanwhile
        if version not in cards:
            try:
                cards = self._cards = {version: store.card(self.model_uri, version)}  # the served version's only
            except store.VersionError:
                raise LookupError(f"version {version}'s model card differs from its manifest") from None
            except Exception as exc:
                # The store's URI and error text stay in the log; this answer may reach anyone with a key.
                log.warning("reading the model card of %s version %d from %s failed: %s", self.name, version,
                            store.where(self.model_uri, version), store.describe(exc))
                raise Unavailable("the model store could not be read for the model card") from None
        card = cards[version]
        if card is None:
            raise LookupError(f"version {version} has no model card")
        return card

    def _call(self, request, count: int) -> tuple[dict[str, np.ndarray], Loaded]:
        try:
            response = self._predict(request, timeout=self.timeout, metadata=self._request_ids())
        except grpc.RpcError as exc:
            raise self._error(exc, "Predict") from None
        outputs = self._outputs(response, count)
        if response.model_spec.HasField("version"):
            version = response.model_spec.version.value
        else:  # an older server that does not say: the newest it reported
            version = self.current.version if self.current else 0
        return outputs, Loaded(version, None, layout.CIFAR10_CLASSES)

    def _outputs(self, response, count: int) -> dict[str, np.ndarray]:
        """Every output TF Serving answered in a dtype a signature of ours has, by name."""
        if OUTPUT not in response.outputs:
            raise UpstreamError(f"TF Serving at {self.address} answered without {OUTPUT!r}", 502)
        if response.outputs[OUTPUT].dtype != DT_FLOAT:
            raise UpstreamError(f"TF Serving at {self.address} answered {OUTPUT!r} with dtype "
                                f"{response.outputs[OUTPUT].dtype}, not float32", 502)
        outputs = {}
        for name, tensor in response.outputs.items():
            if tensor.dtype not in READ:
                continue
            dtype, field = READ[tensor.dtype]
            shape = [d.size for d in tensor.tensor_shape.dim]
            # TF Serving packs numbers in tensor_content; other servers may use the repeated fields.
            if dtype is not object and tensor.tensor_content:
                values = np.frombuffer(tensor.tensor_content, dtype=dtype)
            else:
                values = np.asarray(getattr(tensor, field), dtype=dtype)
            if not shape or shape[0] != count or values.size != math.prod(shape):
                raise UpstreamError(f"TF Serving at {self.address} answered {name!r} with {values.size} values "
                                    f"of shape {shape} for {count} images", 502)
            outputs[name] = values.reshape(shape)
        return outputs

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # a poller that dies would leave readiness stuck
                if not self._stop.is_set():  # after close(), the closed channel is expected to fail
                    self.current, self.last_error = None, f"{type(exc).__name__}: {exc}"
                    log.warning("TF Serving status poll failed: %s", self.last_error)
            self._stop.wait(self.poll_seconds)

    def refresh(self) -> None:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=self.name))
        try:
            response = self._status(request, timeout=self.timeout, metadata=self._request_ids())
        except grpc.RpcError as exc:
            if self._stop.is_set():  # close() cancelled this poll
                return
            # Not reachable, or the model unknown to it: not ready, until a poll says otherwise.
            error = str(self._error(exc, "GetModelStatus"))
            if error != self.last_error:
                log.warning("%s", error)
            self.current, self.last_error = None, error
            return
        available = [s.version for s in response.model_version_status
                     if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        newest = Loaded(max(available), None, layout.CIFAR10_CLASSES) if available else None
        if newest != self.current:
            log.info("TF Serving at %s serves %s version %s", self.address, self.name,
                     newest.version if newest else "none")
        self.current, self.last_error = newest, None

    def status(self) -> Loaded | None:
        return self.current

    @property
    def waiting_for(self) -> str | None:
        """Why no version is served, for /readyz, in a few words: the address and TF Serving's
        own message are in the log."""
        if self.current is not None:
            return None
        return "TF Serving unreachable or without the model" if self.last_error else "no version in TF Serving yet"

    def close(self) -> None:
        self._stop.set()
        self._channel.close()  # also cancels a status poll in flight, so the join is quick
        self._thread.join(timeout=5)
