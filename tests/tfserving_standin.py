"""A stand-in for TF Serving: its gRPC PredictionService and ModelService,
built from tensorflow-serving-api's own service definitions and answering
with a real SavedModel.

In-process, tests drive it through its knobs (which versions are AVAILABLE,
how Predict fails). As a program it plays the `tfserving` container of the
compose scenario: it watches a model base path as TF Serving does (the
highest numeric version folder is served; a newer one replaces it) and
listens on TF Serving's gRPC port:

    python tfserving_standin.py --port 8500 --model_name cifar10 --model_base_path /models/cifar10
"""

import argparse
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from common import layout

AVAILABLE, LOADING = get_model_status_pb2.ModelVersionStatus.AVAILABLE, get_model_status_pb2.ModelVersionStatus.LOADING


class FakeTFServing(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """TF Serving's two services, with knobs: which versions are AVAILABLE, and how Predict fails;
    `.request_ids` records each call's `x-request-id` metadata, as (method, [ids])."""

    def __init__(self, uri, name="cifar10"):
        """`uri`: a version folder to serve as version 1, or None for no version yet."""
        self.name = name
        if uri is not None:
            self.load(uri)
        self.reset({1: AVAILABLE} if uri is not None else {})

    def load(self, uri) -> None:
        self.signatures = tf.saved_model.load(str(uri)).signatures
        saved = saved_model_pb2.SavedModel.FromString((Path(uri) / "saved_model.pb").read_bytes())
        self.signature_defs = saved.meta_graphs[0].signature_def

    def reset(self, versions=None):
        self.versions = {1: AVAILABLE} if versions is None else versions
        self.fail: grpc.StatusCode | None = None
        self.delay = 0.0
        self.float_val = False  # answer in float_val instead of tensor_content
        self.padding = 0  # bytes of an extra output, to make the answer large
        self.release = threading.Event()  # ends a delay early, so teardown never waits on it
        self.request_ids: list[tuple[str, list[str]]] = []

    def record(self, method, context):
        self.request_ids.append((method, [v for k, v in context.invocation_metadata() if k == "x-request-id"]))

    def Predict(self, request, context):
        self.record("Predict", context)
        if not self.versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({self.name})")
        if self.delay:
            self.release.wait(self.delay)
        if self.fail:
            context.abort(self.fail, f"fake says {self.fail.name}\n  at some/internal/frame.cc:12")
        # Our hand-built TensorProtos must be valid TF.
        inputs = {name: tf.constant(tf.make_ndarray(tensor)) for name, tensor in request.inputs.items()}
        outputs = self.signatures[request.model_spec.signature_name](**inputs)
        probabilities = outputs["probabilities"].numpy()
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = request.model_spec.signature_name
        response.model_spec.version.value = max(v for v, s in self.versions.items() if s == AVAILABLE)
        for name, value in outputs.items():  # every output of the signature, as TF Serving answers
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
        out = response.outputs["probabilities"]
        if self.float_val:
            out.Clear()
            out.dtype = tf.float32.as_datatype_enum
            out.tensor_shape.dim.add(size=probabilities.shape[0])
            out.tensor_shape.dim.add(size=probabilities.shape[1])
            out.float_val.extend(probabilities.reshape(-1).tolist())
        if self.padding:
            response.outputs["padding"].CopyFrom(tf.make_tensor_proto(np.zeros(self.padding, np.uint8)))
        return response

    def GetModelMetadata(self, request, context):
        self.record("GetModelMetadata", context)
        answer = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=request.model_spec)
        answer.metadata["signature_def"].Pack(get_model_metadata_pb2.SignatureDefMap(
            signature_def=self.signature_defs))
        return answer

    def GetModelStatus(self, request, context):
        self.record("GetModelStatus", context)
        if request.model_spec.name != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request.model_spec.name}")
        if not self.versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {self.name}")
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[
            get_model_status_pb2.ModelVersionStatus(version=v, state=s) for v, s in sorted(self.versions.items())])


def start_server(fake, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.Server, int]:
    # TF Serving itself accepts messages of any size (SetMaxMessageSize(INT_MAX)), so the fake does too.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(fake, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(fake, server)
    port = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, port


def newest_version(base: Path) -> int | None:
    """TF Serving's default version policy: the highest numeric folder holding a SavedModel."""
    return max(layout.local_versions(base), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--model_name", default="cifar10")
    parser.add_argument("--model_base_path", type=Path, required=True)
    parser.add_argument("--poll_seconds", type=float, default=1.0)
    args = parser.parse_args()
    # Listening from the start, with no version until one appears, as TF Serving does.
    fake = FakeTFServing(None, args.model_name)
    server, port = start_server(fake, "0.0.0.0", args.port)
    print(f"tfserving stand-in: listening on port {port} for {args.model_base_path}", flush=True)
    served = None
    while True:
        newest = newest_version(args.model_base_path)
        if newest is not None and newest != served:
            # Loaded before it is announced, as TF Serving does: the old version answers until then.
            fake.load(args.model_base_path / str(newest))
            fake.versions, served = {newest: AVAILABLE}, newest
            print(f"tfserving stand-in: serving {args.model_name} version {served}", flush=True)
        time.sleep(args.poll_seconds)


if __name__ == "__main__":
    main()
