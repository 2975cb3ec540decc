"""`cifar-serve conformance URL`: send a running server the requests a TF
Serving REST (v1) or Open Inference Protocol v2 client sends, and report every
answer whose form or numbers differ from what TF Serving's documented
behaviour gives for the model the server itself describes.

The expected forms come from the signature the server reports in
`/v1/models/<name>/metadata` (TF Serving's REST API: row format answers one
object per instance keyed by output name, or the bare value when the
signature has one output; columnar answers an object keyed by output name, or
the bare value; errors are `{"error": "..."}`). The numbers must agree across
every route, and with `--export` equal the outputs the job recorded for the
version's probe batch: what the SavedModel itself gave, so what TF Serving
would answer. Only the standard library, numpy and Pillow: it runs wherever the
service's image does, against any server.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import layout
from serve.checks import PROBE_ATOL

# Routes of one server answer from the same graph; they differ only in how
# numbers travel (JSON text or raw bytes), which a float32 survives exactly.
AGREE_ATOL = 1e-6
BYTES_SIGNATURE, SIGNATURE = layout.BYTES_SIGNATURE, layout.SIGNATURE
# A SignatureDef's dtypes as TF Serving names them, as v2 datatypes and numpy dtypes.
DTYPES = {"DT_FLOAT": ("FP32", np.float32), "DT_DOUBLE": ("FP64", np.float64), "DT_HALF": ("FP16", np.float16),
          "DT_INT32": ("INT32", np.int32), "DT_INT64": ("INT64", np.int64), "DT_UINT8": ("UINT8", np.uint8),
          "DT_BOOL": ("BOOL", np.bool_), "DT_STRING": ("BYTES", np.object_)}
GENERATED_IMAGES = 4


class Fail(Exception):
    """A check's finding: what differed."""


class Unusable(Exception):
    """Nothing to check: bad arguments, or no server (exit 2)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...] | None  # None: unknown rank; -1: any size

    @classmethod
    def parse(cls, name: str, info: dict) -> Tensor:
        shape = info.get("tensor_shape") or {}
        dims = None if shape.get("unknown_rank") else tuple(int(d["size"]) for d in shape.get("dim", []))
        if info.get("dtype") not in DTYPES:
            raise Fail(f"tensor {name!r} has dtype {info.get('dtype')!r}, which this command does not know")
        return cls(name, info["dtype"], dims)

    def shape_for(self, n: int) -> list[int] | None:
        return None if self.dims is None else [n, *self.dims[1:]]


def _leaf_ok(value, dtype: str) -> bool:
    if dtype == "DT_STRING":
        return isinstance(value, str)
    if dtype == "DT_BOOL":
        return isinstance(value, bool)
    if dtype in ("DT_FLOAT", "DT_DOUBLE", "DT_HALF"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


def _values(value, tensor: Tensor, where: str) -> np.ndarray:
    """JSON values for `tensor` as an array, or a Fail saying how their type is not the signature's."""
    values = np.array(value, dtype=object)  # ragged lists stay lists, and fail the leaf check
    for leaf in values.flat:
        if not _leaf_ok(leaf, tensor.dtype):
            raise Fail(f"{where}: {json.dumps(leaf)[:60]} is not a {tensor.dtype} value")
    return values if tensor.dtype == "DT_STRING" else values.astype(DTYPES[tensor.dtype][1])


def _array(value, tensor: Tensor, n: int, where: str) -> np.ndarray:
    """`_values`, in the shape the signature gives `tensor` for `n` inputs."""
    values = _values(value, tensor, where)
    _check_shape(list(values.shape), tensor, n, where)
    return values


def _check_shape(shape: list[int], tensor: Tensor, n: int, where: str) -> None:
    want = tensor.shape_for(n)
    if want is not None and (len(shape) != len(want)
                             or any(w not in (-1, s) for s, w in zip(shape, want, strict=True))):
        raise Fail(f"{where}: shape {shape}, the signature says {want} for {n} inputs")


def _differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float) -> list[str]:
    found = []
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            found.append(f"output {name!r} is in only one of them")
        elif got[name].shape != want[name].shape:
            found.append(f"{name} has shape {list(got[name].shape)}, not {list(want[name].shape)}")
        elif want[name].dtype.kind == "f":
            gap = float(np.abs(got[name].astype(np.float64) - want[name].astype(np.float64)).max(initial=0.0))
            if not gap <= atol:
                found.append(f"{name} differs by up to {gap:.3g} (allowed {atol:g})")
        elif (count := int((got[name] != want[name]).sum())):
            found.append(f"{name} differs in {count} of {want[name].size} values")
    return found


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _from_binary(raw: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """A tensor in the binary tensor extension's layout (little-endian; BYTES: uint32 length, then the bytes)."""
    if datatype == "BYTES":
        values, at = [], 0
        while at + 4 <= len(raw):
            length = int.from_bytes(raw[at:at + 4], "little")
            values.append(raw[at + 4:at + 4 + length].decode("utf-8", "replace"))
            at += 4 + length
        array = np.array(values, dtype=object)
    else:
        numpy_dtype = next(np.dtype(t) for d, t in DTYPES.values() if d == datatype)
        try:
            array = np.frombuffer(raw, dtype=numpy_dtype.newbyteorder("<")).astype(numpy_dtype)
        except ValueError:
            raise Fail(f"{where}: {len(raw)} bytes is not a whole number of {datatype} values") from None
    if array.size != math.prod(shape):
        raise Fail(f"{where}: {array.size} values in the binary data for shape {shape}")
    return array.reshape(shape)


class Server:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body); every HTTP status is an answer, and no answer at all is Unusable."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers, exc.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise Unusable(f"no answer from {self.url}{path}: {getattr(exc, 'reason', exc)}") from None

    def json(self, method: str, path: str, payload=None):
        """The JSON of a 200 answer; any other status is a Fail."""
        body = None if payload is None else json.dumps(payload).encode()
        status, _, raw = self.send(method, path, body, {"Content-Type": "application/json"} if body else None)
        if status != 200:
            raise Fail(f"{method} {path} answered {status}: {raw[:200].decode('utf-8', 'replace')}")
        return _json(raw, f"{method} {path}")


def _json(raw: bytes, where: str):
    try:
        return json.loads(raw)
    except ValueError:
        raise Fail(f"{where}: the answer is not JSON: {raw[:80]!r}") from None


class Conformance:
    """The checks, run in order, each printed as it ends."""

    def __init__(self, server: Server, name: str, record: tuple[np.ndarray, dict] | None):
        self.server, self.name, self.record = server, name, record
        self.quoted = urllib.parse.quote(name, safe="")
        self.results: list[tuple[str, str | None]] = []
        self.answers: dict[str, dict[str, np.ndarray]] = {}  # route -> output -> array, for the cross-check
        self.version: str | None = None

    def check(self, title: str, run, *args) -> bool:
        try:
            run(*args)
            failure = None
        except (Fail, Unusable) as exc:
            failure = str(exc)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:  # JSON of another shape
            failure = f"an answer of unexpected form ({type(exc).__name__}: {exc})"
        self.results.append((title, failure))
        print(f"ok   {title}" if failure is None else f"FAIL {title}: {failure}", flush=True)
        return failure is None

    def run(self) -> int:
        v1 = f"/v1/models/{self.quoted}"
        status, _, raw = self.server.send("GET", v1)
        if status == 404:
            raise Unusable(f"GET {v1} answered 404: the server serves no model named {self.name!r} (pass --model)")
        if status in (401, 403):
            raise Unusable(f"GET {v1} answered {status}: the server wants an API key (pass --api-key)")
        self.check("v1 model status", self.v1_status, status, raw)
        if not self.check("v1 metadata", self.v1_metadata):
            return self.summary()  # every other check needs the signature
        self.check("v1 row format (instances)", self.v1_predict, "v1 row", f"{v1}:predict", "instances")
        self.check("v1 columnar format (inputs)", self.v1_predict, "v1 columnar", f"{v1}:predict", "inputs")
        self.check("v1 columnar format, named input", self.v1_predict, "v1 columnar named", f"{v1}:predict",
                   "named inputs")
        self.check(f"v1 versioned route /versions/{self.version}", self.v1_versioned)
        if BYTES_SIGNATURE in self.signatures:
            self.check(f"v1 {BYTES_SIGNATURE} with b64 PNGs, row format", self.v1_b64, "instances")
            self.check(f"v1 {BYTES_SIGNATURE} with b64 PNGs, columnar format", self.v1_b64, "inputs")
        self.check("v2 server metadata (GET /v2)", self.v2_server)
        self.check("v2 health and model readiness", self.v2_health)
        self.check("v2 model metadata", self.v2_metadata)
        self.check("v2 infer, JSON", self.v2_infer, "v2 JSON", f"/v2/models/{self.quoted}/infer", False)
        self.check("v2 infer, binary tensor extension and binary_data_output", self.v2_infer, "v2 binary",
                   f"/v2/models/{self.quoted}/infer", True)
        self.check(f"v2 versioned infer /versions/{self.version}", self.v2_infer, "v2 versioned",
                   f"/v2/models/{self.quoted}/versions/{self.version}/infer", False)
        for title, request in self.error_cases():
            self.check(f"error: {title}", self.error, *request)
        self.check("the same answers from every route", self.agree)
        if self.record is not None:
            self.check("answers equal the export's probe record", self.probe_record)
        return self.summary()

    def summary(self) -> int:
        failed = [title for title, failure in self.results if failure is not None]
        print(f"{len(self.results)} checks of model {self.name!r} at {self.server.url}: "
              f"{len(self.results) - len(failed)} ok, {len(failed)} failed"
              + (f" ({'; '.join(failed)})" if failed else ""))
        return 1 if failed else 0

    # --- v1 ---------------------------------------------------------------------

    def v1_status(self, status: int, raw: bytes) -> None:
        if status != 200:
            raise Fail(f"answered {status}: {raw[:200].decode('utf-8', 'replace')}")
        body = _json(raw, "status")
        versions = body.get("model_version_status") if isinstance(body, dict) else None
        if not isinstance(versions, list) or not versions:
            raise Fail(f"no model_version_status list: {body}")
        available = [v.get("version") for v in versions if isinstance(v, dict) and v.get("state") == "AVAILABLE"]
        if not available or not all(isinstance(v, str) and v.isdigit() for v in available):
            raise Fail(f"no AVAILABLE version written as a string of digits, as TF Serving does: {versions}")
        self.version = max(available, key=int)

    def v1_metadata(self) -> None:
        body = self.server.json("GET", f"/v1/models/{self.quoted}/metadata")
        spec = body.get("model_spec", {})
        if spec.get("name") != self.name or (self.version and spec.get("version") != self.version):
            raise Fail(f"model_spec is {spec}, not name {self.name!r} version {self.version!r}")
        try:
            defs = body["metadata"]["signature_def"]["signature_def"]
            # Only the signatures it sends to: TF Serving lists __saved_model_init_op too, of dtype DT_INVALID.
            self.signatures = {key: ({k: Tensor.parse(k, v) for k, v in sig["inputs"].items()},
                                     {k: Tensor.parse(k, v) for k, v in sig["outputs"].items()})
                               for key, sig in defs.items() if key in (SIGNATURE, BYTES_SIGNATURE)}
            inputs, self.outputs = self.signatures[SIGNATURE]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise Fail(f"metadata.signature_def.signature_def has no serving_default inputs and outputs "
                       f"as TF Serving writes them ({type(exc).__name__}: {exc})") from None
        if len(inputs) != 1:
            raise Fail(f"serving_default takes {sorted(inputs)}; this command sends one image input")
        (self.input,) = inputs.values()
        dims = self.input.dims
        if self.input.dtype != "DT_UINT8" or dims is None or len(dims) != 4 or min(dims[1:]) < 1:
            raise Fail(f"serving_default's input is {self.input}; this command sends uint8 [N, H, W, C] images")
        if self.record is not None:
            self.images = self.record[0]
            if list(self.images.shape[1:]) != list(dims[1:]):
                raise Fail(f"the probe images are {list(self.images.shape)}; the signature takes {list(dims)}")
        else:
            self.images = np.random.default_rng(0).integers(0, 256, (GENERATED_IMAGES, *dims[1:]), dtype=np.uint8)

    def _predict(self, path: str, form: str, signature: str | None = None, values=None) -> dict[str, np.ndarray]:
        """A :predict answer as arrays, after checking its form against TF Serving's for the signature."""
        inputs, outputs = self.signatures[signature or SIGNATURE]
        values = self.images.tolist() if values is None else values
        n = len(values)
        payload = {"inputs": {next(iter(inputs)): values}} if form == "named inputs" else {form: values}
        if signature:
            payload["signature_name"] = signature
        body = self.server.json("POST", path, payload)
        key = "predictions" if form == "instances" else "outputs"
        if not isinstance(body, dict) or set(body) != {key}:
            raise Fail(f"the answer's keys are {sorted(body) if isinstance(body, dict) else body!r}, not [{key!r}]")
        answer = body[key]
        if len(outputs) == 1:  # TF Serving answers a single output as its bare value, in either format
            ((name, tensor),) = outputs.items()
            return {name: _array(answer, tensor, n, key)}
        if form != "instances":
            if not isinstance(answer, dict) or set(answer) != set(outputs):
                raise Fail(f"outputs must be an object keyed by {sorted(outputs)}, got "
                           f"{sorted(answer) if isinstance(answer, dict) else type(answer).__name__}")
            return {name: _array(answer[name], tensor, n, f"outputs.{name}") for name, tensor in outputs.items()}
        if not isinstance(answer, list) or len(answer) != n:
            raise Fail(f"predictions must be a list of {n}, one per instance, got {json.dumps(answer)[:80]}")
        for i, row in enumerate(answer):
            if not isinstance(row, dict) or set(row) != set(outputs):
                raise Fail(f"predictions[{i}] must be an object keyed by {sorted(outputs)}, got {json.dumps(row)[:80]}")
        return {name: _array([row[name] for row in answer], tensor, n, f"predictions[].{name}")
                for name, tensor in outputs.items()}

    def v1_predict(self, route: str, path: str, form: str) -> None:
        self.answers[route] = self._predict(path, form)

    def v1_versioned(self) -> None:
        path = f"/v1/models/{self.quoted}/versions/{self.version}"
        status = self.server.json("GET", path)
        if [v.get("version") for v in status.get("model_version_status", [])] != [self.version]:
            raise Fail(f"GET {path} answered {status}, not the status of version {self.version} alone")
        self.answers["v1 versioned"] = self._predict(f"{path}:predict", "instances")

    def v1_b64(self, form: str) -> None:
        inputs, _ = self.signatures[BYTES_SIGNATURE]
        if len(inputs) != 1 or next(iter(inputs.values())).dtype != "DT_STRING":
            raise Fail(f"{BYTES_SIGNATURE} takes {sorted(inputs)}, not one DT_STRING input")
        encoded = [{"b64": _png_b64(image)} for image in self.images]
        got = self._predict(f"/v1/models/{self.quoted}:predict", "named inputs" if form == "inputs" else form,
                            BYTES_SIGNATURE, encoded)
        route, pixels = self.reference()
        # The model decodes the PNG itself, in another graph than serving_default's: class ids and labels
        # must be the pixels' own, probabilities as close as the probe record's tolerance.
        differ = _differences(got, pixels, PROBE_ATOL)
        if differ:
            raise Fail(f"unlike the same images as pixels ({route}): {'; '.join(differ)}")

    # --- v2 ---------------------------------------------------------------------

    def v2_server(self) -> None:
        body = self.server.json("GET", "/v2")
        if not (isinstance(body.get("name"), str) and isinstance(body.get("version"), str)
                and isinstance(body.get("extensions"), list)):
            raise Fail(f"the protocol requires name and version strings and an extensions list: {body}")

    def v2_health(self) -> None:
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{self.quoted}/ready",
                     f"/v2/models/{self.quoted}/versions/{self.version}/ready"):
            status, _, raw = self.server.send("GET", path)
            if status != 200:
                raise Fail(f"GET {path} answered {status}: {raw[:200].decode('utf-8', 'replace')}")

    def v2_metadata(self) -> None:
        path = f"/v2/models/{self.quoted}"
        body = self.server.json("GET", path)
        if body.get("name") != self.name or self.version not in body.get("versions", [self.version]):
            raise Fail(f"name {body.get('name')!r} and versions {body.get('versions')}, "
                       f"not {self.name!r} with version {self.version!r}")
        for key, tensors in (("inputs", [self.input]), ("outputs", list(self.outputs.values()))):
            got = {t.get("name"): t for t in body.get(key, [])}
            if sorted(map(str, got)) != sorted(t.name for t in tensors):
                raise Fail(f"{key} are {sorted(map(str, got))}; the v1 signature has {sorted(t.name for t in tensors)}")
            for tensor in tensors:
                want = {"datatype": DTYPES[tensor.dtype][0], "shape": list(tensor.dims or [])}
                if tensor.dims is None:  # unknown rank: v2 metadata has no way to say so
                    del want["shape"]
                described = {k: got[tensor.name].get(k) for k in want}
                if described != want:
                    raise Fail(f"{key} {tensor.name!r} is {described}; the v1 signature says {want}")
        versioned = self.server.json("GET", f"{path}/versions/{self.version}")
        if versioned != body:
            raise Fail(f"GET {path}/versions/{self.version} differs from GET {path}")

    def v2_infer(self, route: str, path: str, binary: bool) -> None:
        n = len(self.images)
        tensor = {"name": self.input.name, "datatype": "UINT8", "shape": list(self.images.shape)}
        if binary:
            tensor["parameters"] = {"binary_data_size": self.images.nbytes}
            header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
            status, headers, raw = self.server.send("POST", path, header + self.images.tobytes(), {
                "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
        else:
            tensor["data"] = self.images.reshape(-1).tolist()
            status, headers, raw = self.server.send("POST", path, json.dumps({"inputs": [tensor]}).encode(),
                                                    {"Content-Type": "application/json"})
        if status != 200:
            raise Fail(f"POST {path} answered {status}: {raw[:200].decode('utf-8', 'replace')}")
        split = headers.get("Inference-Header-Content-Length")
        if binary and split is None:
            raise Fail("no Inference-Header-Content-Length header: binary_data_output was not honoured")
        try:
            split = len(raw) if split is None else int(split)
        except ValueError:
            raise Fail(f"Inference-Header-Content-Length is {split!r}") from None
        body, data = _json(raw[:split], "the inference header"), raw[split:]
        if body.get("model_name") != self.name or body.get("model_version", self.version) != self.version:
            raise Fail(f"model_name {body.get('model_name')!r} version {body.get('model_version')!r}, "
                       f"not {self.name!r} version {self.version!r}")
        outputs = body.get("outputs")
        names = [o.get("name") for o in outputs] if isinstance(outputs, list) else None
        if names is None or sorted(names) != sorted(self.outputs):
            raise Fail(f"outputs {names}; with none asked for, every one of {sorted(self.outputs)} is answered")
        arrays = {}
        for out in outputs:
            tensor, where = self.outputs[out["name"]], f"outputs.{out['name']}"
            if out.get("datatype") != DTYPES[tensor.dtype][0]:
                raise Fail(f"{where}: datatype {out.get('datatype')!r}, the signature's is {tensor.dtype}")
            shape = out.get("shape")
            if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
                raise Fail(f"{where}: shape {shape!r} is not a list of integers")
            _check_shape(shape, tensor, n, where)
            size = (out.get("parameters") or {}).get("binary_data_size")
            if binary:
                if not isinstance(size, int) or "data" in out:
                    raise Fail(f"{where}: binary_data_output asked for, but it has no binary_data_size")
                arrays[out["name"]], data = _from_binary(data[:size], out["datatype"], shape, where), data[size:]
            else:
                values = _values(out.get("data"), tensor, f"{where}.data").reshape(-1)  # flat or nested
                if values.size != math.prod(shape):
                    raise Fail(f"{where}: {values.size} values for shape {shape}")
                arrays[out["name"]] = values.reshape(shape)
        if data:
            raise Fail(f"{len(data)} bytes after the last output's binary data")
        self.answers[route] = arrays

    # --- errors and numbers ------------------------------------------------------

    def error_cases(self):
        v1, v2 = f"/v1/models/{self.quoted}", f"/v2/models/{self.quoted}"
        other = urllib.parse.quote(f"{self.name}-not-served", safe="")
        missing = str(int(self.version or 0) + 1000)
        wrong = self.images[:1, :-1].tolist()  # one row short
        as_json = json.dumps
        # TF Serving answers INVALID_ARGUMENT and FAILED_PRECONDITION (an unknown signature) as 400,
        # NOT_FOUND as 404 (model_servers/http_server.cc); the v2 protocol
        # asks only for an error status ("usually 400") with the same {"error": ...} body.
        return [
            ("malformed JSON (v1)", ("POST", f"{v1}:predict", b'{"instances": [', 400)),
            ("wrong image shape (v1)", ("POST", f"{v1}:predict", as_json({"instances": wrong}).encode(), 400)),
            ("unknown signature_name (v1)", ("POST", f"{v1}:predict", as_json(
                {"signature_name": "no_such_signature", "instances": self.images[:1].tolist()}).encode(), 400)),
            ("unknown model (v1 status)", ("GET", f"/v1/models/{other}", None, 404)),
            ("unknown model (v1 predict)", ("POST", f"/v1/models/{other}:predict",
                                            as_json({"instances": self.images[:1].tolist()}).encode(), 404)),
            ("unknown version (v1 predict)", ("POST", f"{v1}/versions/{missing}:predict",
                                              as_json({"instances": self.images[:1].tolist()}).encode(), 404)),
            ("malformed JSON (v2 infer)", ("POST", f"{v2}/infer", b'{"inputs": [', None)),
            ("wrong image shape (v2 infer)", ("POST", f"{v2}/infer", as_json({"inputs": [
                {"name": self.input.name, "datatype": "UINT8", "shape": list(np.shape(wrong)),
                 "data": np.ravel(wrong).tolist()}]}).encode(), None)),
            ("unknown model (v2 metadata)", ("GET", f"/v2/models/{other}", None, None)),
            ("unknown version (v2 metadata)", ("GET", f"{v2}/versions/{missing}", None, None)),
        ]

    def error(self, method: str, path: str, body: bytes | None, want: int | None) -> None:
        status, _, raw = self.server.send(method, path, body, {"Content-Type": "application/json"} if body else None)
        if not 400 <= status < 500 or (want is not None and status != want):
            raise Fail(f"{method} {path} answered {status}, not {want or 'a 4xx'}")
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not (isinstance(answer, dict) and set(answer) == {"error"} and isinstance(answer["error"], str)
                and answer["error"]):
            raise Fail(f'the body is not {{"error": "<message>"}}: {raw[:120]!r}')

    def reference(self) -> tuple[str, dict[str, np.ndarray]]:
        """The first route whose answer to the images passed its form check: v1 row format, unless it failed."""
        if not self.answers:
            raise Fail("nothing to compare with: no route answered the images in the form expected")
        return next(iter(self.answers.items()))

    def agree(self) -> None:
        reference, expected = self.reference()
        differ = [f"{route}: {'; '.join(found)}" for route, arrays in self.answers.items()
                  if (found := _differences(arrays, expected, AGREE_ATOL))]
        if differ:
            raise Fail(f"unlike the {reference} answers: {' | '.join(differ)}")

    def probe_record(self) -> None:
        route, answers = self.reference()
        differ = _differences(answers, self.record[1], PROBE_ATOL)
        if differ:
            raise Fail(f"served version {self.version} ({route}): {'; '.join(differ)}")


def _record(version_dir: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    try:
        images = np.load(Path(version_dir) / layout.PROBE_IMAGES, allow_pickle=False)
        with np.load(Path(version_dir) / layout.PROBE_OUTPUTS, allow_pickle=False) as outputs:
            return images, dict(outputs)
    except (OSError, ValueError) as exc:
        raise Unusable(f"--export {version_dir}: no probe record in assets.extra/ ({exc})") from None


def _model_name(server: Server, args) -> str:
    if args.model:
        return args.model
    # This service names its model on /readyz; TF Serving has no route that lists its models.
    status, _, raw = server.send("GET", "/readyz")
    if status in (200, 503):
        try:
            name = json.loads(raw).get("model")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            return name
    if args.export:  # TF Serving's layout, which the job's export follows: <base>/<model name>/<version>
        return Path(args.export).resolve().parent.name
    raise Unusable("cannot tell which model the server serves; pass --model NAME")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cifar-serve conformance", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a running server's TF Serving REST (v1) and Open Inference Protocol v2 answers\n"
                    "for the model it serves against TF Serving's documented behaviour for that model.",
        epilog="exit status: 0 every check passed; 1 some check failed; 2 usage error, or the server is\n"
               "unreachable or serves no such model.")
    parser.add_argument("url", help="the server's HTTP address, e.g. http://localhost:8080")
    parser.add_argument("--model", help="the model name in its routes (default: from the server's /readyz, "
                                        "else the --export directory's model name)")
    parser.add_argument("--export", metavar="VERSION_DIR",
                        help="the exported version directory: its probe images are sent, and the answers "
                             "compared with its recorded outputs (default: a few generated images)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    args = parser.parse_args(argv)
    try:
        record = _record(args.export) if args.export else None
        server = Server(args.url, args.api_key, args.timeout)
        return Conformance(server, _model_name(server, args), record).run()
    except Unusable as exc:
        print(f"cifar-serve conformance: error: {exc}", file=sys.stderr)
        return 2
