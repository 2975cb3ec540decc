"""Property-based fuzzing of every route of the prediction service, and a
battery of hand-written malformed requests.

The contract: whatever a client sends, the answer is never a 5xx, and every
4xx carries `{"error": "<what is wrong>"}`.
"""

import base64
import copy
import io
import json
import math
import os
import struct
import zlib
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import pixels, png
from serve.app import create_app
from serve.settings import Settings

NAME = "cifar10"
# Pillow warns about the corrupt TIFF/EXIF data and the huge images sent here; the answer is still a 400.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
FUZZ = settings(max_examples=int(os.environ.get("SERVE_FUZZ_EXAMPLES", "600")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the service under test ------------------------------------------------------

@pytest.fixture(scope="module")
def small_client(app, exported_model):
    """The same loaded model behind an app whose body limit is 2048 bytes."""
    backend = app.extensions["predictor"].backend
    small = create_app(Settings(model_uri=str(exported_model), poll_seconds=0.2, max_body_bytes=2048), backend=backend)
    return small.test_client()


def check(response):
    """No 5xx; every 4xx is JSON with a non-empty string "error"."""
    text = response.get_data()[:300]
    assert response.status_code < 500, (response.status_code, text)
    if 400 <= response.status_code < 500:
        body = response.get_json(silent=True)
        assert isinstance(body, dict), (response.status_code, text)
        assert isinstance(body.get("error"), str) and body["error"], (response.status_code, text)
        assert " object at 0x" not in body["error"], body  # no Python reprs in what a client reads
    return response


# --- strategies -------------------------------------------------------------------

KEYS = ["instances", "b64", "inputs", "outputs", "name", "shape", "datatype", "data", "parameters",
        "binary_data_size", "binary_data", "id", "signature_name", "file", "images"]
ODD_STRINGS = ["NaN", "nan", "Infinity", "-inf", "1e999", "0x10", "", "255", "256", "-1", "images", "UINT8",
               "b64", "iVBORw0KGgo=", "/9j/4AAQ", "\x00", "\ud7ff", "😀"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(ODD_STRINGS),
)
JSON = st.recursive(
    LEAVES,
    lambda kids: st.one_of(st.lists(kids, max_size=6),
                           st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), kids, max_size=5)),
    max_leaves=40,
)
BAD_PIXELS = st.one_of(
    st.sampled_from([256, -1, 255.5, 1e308, True, None, "12", "NaN", [], [1, 2, 3], {"b64": ""}, float("nan"),
                     float("inf")]),
    st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 64, 2 ** 1100]),  # beyond int64, and beyond float64
    st.floats(), st.integers(),
)
SHAPES = [(32, 32, 3)] * 4 + [(33, 32, 3), (32, 32, 4), (32, 32), (1, 32, 32, 3), (32, 31, 3), (3, 32, 32), (0,)]


def poke(nested, index: int, value):
    """Replace one element somewhere in a nested list (chosen by `index`)."""
    node = nested
    while isinstance(node, list) and node:
        i = index % len(node)
        index //= len(node)
        if isinstance(node[i], list) and node[i]:
            node = node[i]
        else:
            node[i] = copy.deepcopy(value)  # never share (or nest into itself) a drawn list
            return


@st.composite
def pixel_lists(draw):
    """A 32x32x3-ish nested list of 0..255 numbers, sometimes slightly wrong."""
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    values = rng.integers(0, 256, size=shape)
    nested = (values + 0.5 * draw(st.booleans())).tolist() if values.size else []
    for index, bad in draw(st.lists(st.tuples(st.integers(0, 10 ** 6), BAD_PIXELS), max_size=3)):
        poke(nested, index, bad)
    return nested


FORMATS = {"PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"], "JPEG": ["RGB", "L", "CMYK"],
           "GIF": ["P"], "BMP": ["RGB"], "WEBP": ["RGB"], "TIFF": ["RGB"]}


@st.composite
def image_bytes(draw):
    """An encoded image of any size and a few formats, maybe truncated or with bytes flipped."""
    fmt = draw(st.sampled_from(sorted(FORMATS) + ["PNG", "JPEG", "PNG", "JPEG"]))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    data = bytearray(out.getvalue())
    for index, byte in draw(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=6)):
        data[index % len(data)] = byte
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut] if cut is not None else data)


def png_chunks(data: bytes) -> list[list[bytes]]:
    """A PNG's chunks as [type, payload] pairs (after the signature)."""
    out, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        out.append([data[at + 4:at + 8], data[at + 8:at + 8 + length]])
        at += 12 + length
    return out


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


@st.composite
def mangled_pngs(draw):
    """A PNG broken at the chunk level: its image data split over several IDAT chunks, then
    chunks retyped, dropped, repeated, swapped, cut short or given a wrong CRC; then maybe truncated."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    mode = draw(st.sampled_from(["RGB", "RGBA", "P", "L", "I;16"]))
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=size + (3,), dtype=np.uint8)).convert(mode).save(out, format="PNG")
    chunks = png_chunks(out.getvalue())
    idat = b"".join(p for k, p in chunks if k == b"IDAT")
    pieces = draw(st.integers(1, 5))
    step = max(1, -(-len(idat) // pieces))
    split = [[b"IDAT", idat[i:i + step]] for i in range(0, len(idat), step)]
    first = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
    chunks = chunks[:first] + split + [c for c in chunks[first:] if c[0] != b"IDAT"]
    crcs = [None] * len(chunks)
    for op, index, value in draw(st.lists(st.tuples(
            st.sampled_from(["retype", "drop", "repeat", "cut", "crc", "swap"]), st.integers(0, 50),
            st.binary(min_size=4, max_size=4)), min_size=1, max_size=3)):
        i = index % len(chunks)
        if op == "retype":
            chunks[i][0] = value
        elif op == "drop" and len(chunks) > 1:
            del chunks[i], crcs[i]
        elif op == "repeat":
            chunks.insert(i, list(chunks[i]))
            crcs.insert(i, crcs[i])
        elif op == "cut":
            chunks[i][1] = chunks[i][1][:value[0] % (len(chunks[i][1]) + 1)]
        elif op == "crc":
            crcs[i] = int.from_bytes(value, "big")
        elif op == "swap":
            j = value[0] % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, p, c) for (k, p), c in zip(chunks, crcs, strict=True))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return data[:cut]


B64 = st.one_of(
    st.one_of(image_bytes(), mangled_pngs()).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),
    JSON,
)
INSTANCES = st.one_of(pixel_lists(), st.fixed_dictionaries({"b64": B64}),
                      st.dictionaries(st.sampled_from(KEYS), B64, max_size=3), JSON)
NAMES = st.one_of(st.just(NAME), st.sampled_from(["", "CIFAR10", "cifar10 ", "cifar10:predict", "..", "a/b"]),
                  st.text(max_size=12))


def deep(n: int, inner: str = "") -> str:
    return "[" * n + inner + "]" * n


@st.composite
def v1_bodies(draw):
    """TF Serving REST bodies: valid-looking, slightly wrong, or raw JSON text."""
    kind = draw(st.sampled_from(["instances", "instances", "json", "deep", "digits"]))
    if kind == "instances":
        body = {"instances": draw(st.one_of(st.lists(INSTANCES, max_size=3), JSON))}
        if draw(st.booleans()):
            body["signature_name"] = draw(st.one_of(st.sampled_from(["serving_default", "predict_image_bytes"]), JSON))
        if draw(st.booleans()):
            body[draw(st.sampled_from(KEYS))] = draw(JSON)
        return json.dumps(body)
    if kind == "json":
        return json.dumps(draw(JSON))
    if kind == "deep":
        return '{"instances": [' + deep(draw(st.integers(1, 5000))) + "]}"
    return '{"instances": [[[[' + "9" * draw(st.integers(300, 6000)) + "]]]]}"


@st.composite
def v2_requests(draw):
    """Open Inference Protocol bodies, JSON or with the binary tensor extension: (bytes, headers).
    Half of them are right but for one detail, so the checks past the envelope get exercised too."""
    odd_ints = st.sampled_from([2 ** 54, 2 ** 63, 2 ** 64 + 1, -(2 ** 63), 10 ** 30, 0, -1])
    valid_looking = draw(st.integers(0, 2)) > 0
    if valid_looking:
        shape = draw(st.one_of(st.integers(1, 3), odd_ints).map(lambda n: [n, 32, 32, 3]))
        tensor = {"name": "images", "shape": shape, "datatype": "UINT8"}
    else:
        shape = draw(st.one_of(st.lists(st.one_of(st.integers(-5, 40), st.integers(), odd_ints), max_size=6), JSON))
        tensor = {"name": draw(st.sampled_from(["images", "probabilities", "x"])), "shape": shape,
                  "datatype": draw(st.one_of(st.sampled_from(["UINT8", "FP32", "INT8", "uint8", "BYTES"]),
                                             st.text(max_size=5)))}
    small = isinstance(shape, list) and all(type(d) is int and 0 <= d <= 40 for d in shape)
    count = math.prod(shape) if small else 0
    mode = draw(st.sampled_from(["json", "binary", "binary", "none", "garbage", "raw"]))
    if mode == "raw":  # text that json.loads refuses in ways other than JSONDecodeError
        text = draw(st.sampled_from(['{"id": ' + "1" * 5000 + "}", deep(5000), '{"inputs": [' + deep(3000) + "]}",
                                     '{"inputs": [{"shape": [' + "9" * 4400 + "]}]}", "\udcff", '"\ud800"']))
        return text.encode("utf-8", "surrogatepass"), {}
    payload = b""
    if mode == "json":
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        length = draw(st.one_of(st.just(count), st.integers(0, 20))) if count <= 4 * 3072 else 5
        data = rng.integers(0, 256, size=length).tolist()
        if draw(st.booleans()) and small and length == count:
            data = np.reshape(data, shape).tolist()  # nested, as some clients send it
        for index, bad in draw(st.lists(st.tuples(st.integers(0, 10 ** 6), BAD_PIXELS), max_size=3)):
            poke(data, index, bad)
        tensor["data"] = data
    elif mode == "binary":
        if valid_looking:  # the right size, or a near miss of it
            size = draw(st.sampled_from([count, count, float(count), str(count), count - 1, count + 1, 0, True]))
        else:
            size = draw(st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.booleans(), JSON))
        tensor["parameters"] = {"binary_data_size": size}
        payload = draw(st.one_of(st.just(bytes(count)) if count <= 4 * 3072 else st.just(b""),
                                 st.binary(max_size=4000)))
    elif mode == "garbage":
        tensor["data"] = draw(JSON)
        tensor["parameters"] = draw(JSON)
    body = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": draw(LEAVES)}}]
    if draw(st.booleans()):
        body["id"] = draw(st.one_of(st.text(max_size=8), JSON))
    if draw(st.integers(0, 3)) == 0:
        body[draw(st.sampled_from(KEYS))] = draw(JSON)
    header = json.dumps(body).encode()
    headers = {}
    if mode == "binary" or draw(st.booleans()):
        right = str(len(header))
        headers["Inference-Header-Content-Length"] = right if valid_looking and draw(st.booleans()) else draw(st.one_of(
            st.just(right), st.just(f" {right} "), st.integers().map(str),
            st.integers(-5, len(header) + 10).map(str),
            st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=10)))
    return header + payload, headers


CONTENT_TYPES = ["application/json", "image/png", "image/jpeg", "application/octet-stream", "text/plain",
                 "multipart/form-data", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                 "image/gif", "", "application/json; charset=latin-1"]


@st.composite
def bodies(draw):
    """Any body at all, as keyword arguments for the test client."""
    kind = draw(st.sampled_from(["none", "json", "v1", "v2", "bytes", "image", "multipart", "invalid-json"]))
    if kind == "none":
        return {}
    if kind == "json":
        return {"data": json.dumps(draw(JSON)), "content_type": "application/json"}
    if kind == "v1":
        return {"data": draw(v1_bodies()), "content_type": "application/json"}
    if kind == "v2":
        data, headers = draw(v2_requests())
        return {"data": data, "headers": headers,
                "content_type": draw(st.sampled_from(["application/json", "application/octet-stream"]))}
    if kind == "invalid-json":
        return {"data": draw(st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"{", b"[1,", b'{"instances": [}', b"\xff\xfe\x00", b"nul", b'{"a": 1}{"b": 2}']))),
            "content_type": "application/json"}
    if kind == "image":
        return {"data": draw(image_bytes()), "content_type": draw(st.sampled_from(CONTENT_TYPES))}
    if kind == "multipart":
        field = draw(st.sampled_from(["file", "file", "image", ""]))
        content = draw(st.one_of(image_bytes(), st.binary(max_size=300)))
        return {"data": {field: (io.BytesIO(content), draw(st.text(max_size=12)) or "x")},
                "content_type": "multipart/form-data"}
    return {"data": draw(st.binary(max_size=500)), "content_type": draw(st.sampled_from(CONTENT_TYPES))}


ROUTES = ["/healthz", "/readyz", "/v1/models/{}", "/v1/models/{}/metadata", "/v1/models/{}:predict",
          "/v2/health/live", "/v2/health/ready", "/v2/models/{}", "/v2/models/{}/ready", "/v2/models/{}/infer",
          "/v2/models/{}/versions/{}", "/v2/models/{}/versions/{}/ready", "/v2/models/{}/versions/{}/infer",
          "/predict", "/ping", "/invocations", "/metrics", "/openapi.json", "/docs", "/docs/{}", "/"]
METHODS = ["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)  # what a server passes on


# --- properties ----------------------------------------------------------------------

@pytest.mark.slow
@FUZZ
@given(route=st.sampled_from(ROUTES), method=st.sampled_from(METHODS), name=NAMES, version=NAMES,
       body=bodies(), request_id=st.one_of(st.none(), HEADER_TEXT),
       extra=st.dictionaries(st.sampled_from(["Inference-Header-Content-Length", "Accept", "Content-Encoding",
                                              "Transfer-Encoding", "Authorization", "X-API-Key"]),
                             HEADER_TEXT, max_size=2))
def test_any_request_to_any_route_gets_no_5xx(client, route, method, name, version, body, request_id, extra):
    body = dict(body)
    path = route.format(quote(name, safe=""), quote(version, safe=""))
    headers = {**extra, **body.pop("headers", {})}
    headers.pop("Transfer-Encoding", None)  # the test client frames the body itself
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    check(client.open(path, method=method, headers=headers, **body))


@pytest.mark.slow
@FUZZ
@given(body=v1_bodies(), name=st.one_of(st.just(NAME), NAMES))
def test_tf_serving_predict_never_5xx(client, body, name):
    response = check(client.post(f"/v1/models/{quote(name, safe='')}:predict", data=body,
                                 content_type="application/json"))
    if response.status_code == 200:
        answer = response.get_json()
        if "outputs" in answer:  # columnar
            assert len(answer["outputs"]["probabilities"]) == len(answer["outputs"]["label"]) > 0
        else:
            assert answer["predictions"] and all(len(p["probabilities"]) == 10 for p in answer["predictions"])


@pytest.mark.slow
@FUZZ
@given(request=v2_requests())
def test_v2_infer_never_5xx(client, request):
    data, headers = request
    response = check(client.post(f"/v2/models/{NAME}/infer", data=data, headers=headers,
                                 content_type="application/octet-stream" if headers else "application/json"))
    if response.status_code == 200 and response.mimetype == "application/json":
        outputs = {out["name"]: out for out in response.get_json()["outputs"]}
        assert set(outputs) <= {"class_id", "label", "probabilities"} and outputs
        for out in outputs.values():  # a JSON output holds its whole shape; a binary one says its size
            if "data" in out:
                assert len(out["data"]) == math.prod(out["shape"])
            else:
                assert out["parameters"]["binary_data_size"] > 0


@pytest.mark.slow
@FUZZ
@given(image=st.one_of(image_bytes(), mangled_pngs()), how=st.sampled_from(["image/png", "image/jpeg", "multipart"]))
def test_upload_of_any_image_bytes_never_5xx(client, image, how):
    if how == "multipart":
        response = client.post("/predict", data={"file": (io.BytesIO(image), "upload")},
                               content_type="multipart/form-data")
    else:
        response = client.post("/predict", data=image, content_type=how)
    check(response)
    if response.status_code == 200:
        assert len(response.get_json()["predictions"]) == 5


# --- a battery of malformed requests ---------------------------------------------------

def broken_png() -> bytes:
    """A PNG whose second data chunk has a garbage chunk type (Pillow raises SyntaxError for it)."""
    compressed = zlib.compress(b"".join(b"\x00" + bytes(range(96)) for _ in range(32)))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", compressed[:20]) + png_chunk(b"\x00\x01\x02\x03", compressed[20:])
            + png_chunk(b"IEND", b""))


def bomb_png(side: int = 8900) -> bytes:
    """A complete, valid PNG of side x side black pixels (79 megapixels for 8900) in ~10 KB."""
    row = bytes(1 + -(-side // 8))  # filter byte + 1-bit pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (32, 32)).save(out, format="GIF")
    return out.getvalue()


PIXELS = pixels(1, seed=5)[0]
GOOD_PNG = png(PIXELS)
V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"


def instance_with(value):
    nested = PIXELS.tolist()
    nested[3][4][1] = value
    return nested


def v1(instances, **extra):
    return {"data": json.dumps({"instances": instances, **extra}), "content_type": "application/json"}


def v2(shape=(1, 32, 32, 3), datatype="UINT8", data=None, parameters=None, name="images"):
    tensor = {"name": name, "shape": list(shape), "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    if parameters is not None:
        tensor["parameters"] = parameters
    return {"inputs": [tensor]}


def v2_binary(body: dict, payload: bytes, header_length=None):
    header = json.dumps(body).encode()
    length = str(len(header)) if header_length is None else header_length
    return {"data": header + payload, "content_type": "application/octet-stream",
            "headers": {"Inference-Header-Content-Length": length}}


BAD = [
    # (id, method, path, client.open kwargs, status, a word the error must contain)
    ("empty-body", "POST", V1, {"data": b"", "content_type": "application/json"}, 400, "JSON"),
    ("text-plain-v1", "POST", V1, {"data": "instances", "content_type": "text/plain"}, 400, "JSON"),
    ("invalid-json", "POST", V1, {"data": b'{"instances": [', "content_type": "application/json"}, 400, "JSON"),
    ("instances-not-a-list", "POST", V1, {"json": {"instances": 5}}, 400, "instances"),
    ("empty-instances", "POST", V1, v1([]), 400, "at least 1"),
    ("unknown-key", "POST", V1, v1([PIXELS.tolist()], inputs=1), 400, "inputs"),
    ("unknown-signature", "POST", V1, v1([PIXELS.tolist()], signature_name="other"), 400, "signature_name"),
    ("33x32x3", "POST", V1, v1([np.zeros((33, 32, 3), int).tolist()]), 400, "[33, 32, 3]"),
    ("value-256", "POST", V1, v1([instance_with(256)]), 400, "0 to 255"),
    ("value-minus-1", "POST", V1, v1([instance_with(-1)]), 400, "0 to 255"),
    ("value-nan", "POST", V1, v1([instance_with(float("nan"))]), 400, "0 to 255"),
    ("value-huge-int", "POST", V1, v1([instance_with(10 ** 400)]), 400, "numbers"),
    ("value-string", "POST", V1, v1([instance_with("cat")]), 400, "numbers"),
    ("instance-a-string", "POST", V1, v1(["cat"]), 400, "32x32x3"),
    ("deep-nesting", "POST", V1, {"data": '{"instances": [' + deep(100_000) + "]}",
                                  "content_type": "application/json"}, 400, "JSON"),
    ("b64-not-base64", "POST", V1, v1([{"b64": "!!!"}]), 400, "base64"),
    ("b64-not-a-string", "POST", V1, v1([{"b64": 5}]), 400, "base64 string"),
    ("b64-extra-key", "POST", V1, v1([{"b64": "", "x": 1}]), 400, "b64"),
    ("b64-gif", "POST", V1, v1([{"b64": base64.b64encode(gif()).decode()}]), 400, "GIF"),
    ("wrong-model-v1", "POST", "/v1/models/resnet:predict", v1([PIXELS.tolist()]), 404, "resnet"),
    ("wrong-model-status", "GET", "/v1/models/resnet", {}, 404, "resnet"),
    ("wrong-model-v2", "POST", "/v2/models/resnet/infer", {"json": v2(data=[0] * 3072)}, 404, "resnet"),
    ("wrong-model-v2-ready", "GET", "/v2/models/resnet/ready", {}, 404, "resnet"),
    ("v2-wrong-datatype", "POST", V2, {"json": v2(datatype="FP32", data=[0] * 3072)}, 400, "UINT8"),
    ("v2-wrong-shape", "POST", V2, {"json": v2(shape=(1, 32, 32), data=[0] * 3072)}, 400, "shape"),
    ("v2-wrong-input-name", "POST", V2, {"json": v2(name="input_1", data=[0] * 3072)}, 400, "images"),
    ("v2-data-length", "POST", V2, {"json": v2(data=[0] * 3071)}, 400, "3071 values"),
    ("v2-no-data", "POST", V2, {"json": v2()}, 400, "no data"),
    ("v2-value-300", "POST", V2, {"json": v2(data=[300] * 3072)}, 400, "0 to 255"),
    ("v2-value-huge-int", "POST", V2, {"json": v2(data=[10 ** 400] * 3072)}, 400, "numbers"),
    ("v2-no-inputs", "POST", V2, {"json": {"inputs": []}}, 400, "inputs"),
    ("v2-not-json", "POST", V2, {"data": b"\xff{", "content_type": "application/json"}, 400, "JSON"),
    ("v2-deep-nesting", "POST", V2, {"data": deep(100_000), "content_type": "application/json"}, 400, "JSON"),
    ("v2-5000-digit-id", "POST", V2, {"data": '{"id": ' + "1" * 5000 + "}", "content_type": "application/json"},
     400, "JSON"),
    ("binary-header-length-text", "POST", V2, v2_binary(v2(parameters={"binary_data_size": 3072}), bytes(3072),
                                                         header_length="abc"), 400, "integer"),
    ("binary-header-length-outside", "POST", V2, v2_binary(v2(parameters={"binary_data_size": 3072}), bytes(3072),
                                                            header_length="999999"), 400, "outside"),
    ("binary-size-short", "POST", V2, v2_binary(v2(parameters={"binary_data_size": 3072}), bytes(100)), 400,
     "binary_data_size"),
    ("binary-size-float", "POST", V2, v2_binary(v2(parameters={"binary_data_size": 3072.0}), bytes(3072)), 400,
     "binary_data_size"),
    ("binary-shape-overflows", "POST", V2, v2_binary(v2(shape=(2 ** 54, 32, 32, 3),
                                                        parameters={"binary_data_size": 0}), b""), 400,
     "binary_data_size"),
    ("multipart-without-file", "POST", "/predict", {"data": {"image": (io.BytesIO(GOOD_PNG), "a.png")},
                                                    "content_type": "multipart/form-data"}, 400, '"file"'),
    ("text-plain-upload", "POST", "/predict", {"data": b"hello", "content_type": "text/plain"}, 400, "image/png"),
    ("text-as-png", "POST", "/predict", {"data": b"hello", "content_type": "image/png"}, 400, "not a PNG or JPEG"),
    ("text-as-multipart-file", "POST", "/predict", {"data": {"file": (io.BytesIO(b"hello"), "a.txt")},
                                                    "content_type": "multipart/form-data"}, 400, "not a PNG or JPEG"),
    ("empty-png", "POST", "/predict", {"data": b"", "content_type": "image/png"}, 400, "empty"),
    ("truncated-png", "POST", "/predict", {"data": GOOD_PNG[:100], "content_type": "image/png"}, 400,
     "cannot decode"),
    ("broken-png-chunk", "POST", "/predict", {"data": broken_png(), "content_type": "image/png"}, 400,
     "cannot decode"),
    ("decompression-bomb", "POST", "/predict", {"data": bomb_png(), "content_type": "image/png"}, 400,
     "at most 4096x4096"),
    ("gif-upload", "POST", "/predict", {"data": {"file": (io.BytesIO(gif()), "a.gif")},
                                        "content_type": "multipart/form-data"}, 400, "GIF"),
    ("get-on-predict", "GET", "/predict", {}, 405, "not allowed"),
    ("get-on-v1-predict", "GET", V1, {}, 405, "not allowed"),
    ("get-on-v2-infer", "GET", V2, {}, 405, "not allowed"),
    ("post-on-healthz", "POST", "/healthz", {}, 405, "not allowed"),
    ("unknown-path", "GET", "/v3/models", {}, 404, "not found"),
]


@pytest.mark.parametrize("method, path, kwargs, status, word", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_a_malformed_request_gets_the_right_4xx_saying_what_is_wrong(client, method, path, kwargs, status, word):
    response = check(client.open(path, method=method, **kwargs))
    assert response.status_code == status, response.get_json()
    assert word.lower() in response.get_json()["error"].lower(), response.get_json()
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("method, path, kwargs", [
    ("POST", V1, v1([PIXELS.tolist()])),
    ("POST", V2, {"json": v2(data=[0] * 3072)}),
    ("POST", "/predict", {"data": bytes(3000), "content_type": "image/png"}),
    ("POST", "/predict", {"data": {"file": (io.BytesIO(bytes(3000)), "a.png")}, "content_type": "multipart/form-data"}),
], ids=["v1", "v2", "raw-png", "multipart"])
def test_a_body_over_max_body_bytes_gets_413(small_client, method, path, kwargs):
    response = check(small_client.open(path, method=method, **kwargs))
    assert response.status_code == 413
    assert "2048" in response.get_json()["error"]
    assert small_client.get("/healthz").status_code == 200


def test_the_service_still_answers_after_the_battery(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    response = client.post("/predict", data=GOOD_PNG, content_type="image/png")
    assert response.status_code == 200 and len(response.get_json()["predictions"]) == 5
