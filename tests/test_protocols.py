"""Each protocol's decode (request body -> images and options) and encode
(outputs -> response body), as pure functions: no app, no request, no model."""

import base64
import json

import numpy as np
import pytest
from PIL import Image

from helpers import pixels, png
from common.images import BadInput
from serve import page, schemas, v1, v2

PIXELS = pixels(2, seed=3)
OUTPUTS = {"class_id": np.array([3, 5]), "label": np.array(["cat", "dog"], dtype=object),
           "probabilities": np.full((2, 10), 0.1, dtype=np.float32)}


def test_v1_decodes_row_and_columnar_bodies_to_the_same_images():
    rows, columnar = v1.decode({"instances": PIXELS.tolist()})
    assert not columnar and rows.dtype == np.uint8 and np.array_equal(rows, PIXELS)
    for inputs in (PIXELS.tolist(), {"images": PIXELS.tolist()}):
        images, columnar = v1.decode({"inputs": inputs})
        assert columnar and np.array_equal(images, PIXELS)


def test_v1_decodes_b64_for_the_bytes_signature_to_the_files_themselves():
    data = png(PIXELS[0])
    encoded, columnar = v1.decode({"signature_name": "predict_image_bytes",
                                   "instances": [{"b64": base64.b64encode(data).decode()}]})
    assert encoded == [data] and not columnar


@pytest.mark.parametrize(("body", "message"), [
    ({}, "exactly one of"),
    ({"instances": PIXELS.tolist(), "inputs": []}, "exactly one of"),
    ({"instances": [[1, 2]]}, "instances[0]: expected shape [32, 32, 3]"),
    ({"inputs": {"pixels": []}}, "expected exactly one input, named 'images'"),
    ({"inputs": []}, "inputs: must be a non-empty list"),
    ({"instances": PIXELS.tolist(), "signature_name": "other"}, "unknown signature_name"),
    ({"signature_name": "predict_image_bytes", "instances": [PIXELS[0].tolist()]}, 'expected {"b64"'),
])
def test_v1_refuses_what_tf_serving_refuses(body, message):
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        v1.decode(body)


def test_v1_encodes_rows_by_instance_and_columns_by_output():
    rows = v1.encode(OUTPUTS, columnar=False)
    assert rows["predictions"][1] == {"class_id": 5, "label": "dog",
                                      "probabilities": OUTPUTS["probabilities"][1].tolist()}
    assert v1.encode(OUTPUTS, columnar=True)["outputs"]["label"] == ["cat", "dog"]
    # One output: its bare values, as TF Serving answers such a signature.
    assert v1.encode({"probabilities": OUTPUTS["probabilities"]}, columnar=False) == {
        "predictions": OUTPUTS["probabilities"].tolist()}


def infer_body(**tensor) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 32, 32, 3], **tensor}]}


def test_v2_decodes_json_data_and_binary_tensors_alike():
    images, body = v2.decode(json.dumps(infer_body(data=PIXELS.reshape(-1).tolist())).encode(), None)
    assert np.array_equal(images, PIXELS) and isinstance(body, schemas.V2InferRequest)
    header = json.dumps(infer_body(parameters={"binary_data_size": PIXELS.size})).encode()
    images, _ = v2.decode(header + PIXELS.tobytes(), str(len(header)))
    assert np.array_equal(images, PIXELS)


# A binary tensor announced but not sent.
SHORT = json.dumps(infer_body(parameters={"binary_data_size": PIXELS.size})).encode()


@pytest.mark.parametrize(("raw", "header_length", "message"), [
    (b"{", None, "must be JSON"),
    (b"{}", "x", "must be an integer"),
    (b"{}", "9", "outside the body"),
    (json.dumps(infer_body(datatype="FP32", data=[])).encode(), None, "must be UINT8"),
    (json.dumps(infer_body(data=[1, 2, 3])).encode(), None, "3 values for shape"),
    (json.dumps(infer_body()).encode(), None, "has no data"),
    (SHORT, str(len(SHORT)), "binary_data_size 6144 does not match"),
])
def test_v2_refuses_malformed_requests(raw, header_length, message):
    with pytest.raises(BadInput, match=message):
        v2.decode(raw, header_length)


def test_v2_encodes_json_outputs_or_binary_ones_after_the_header():
    request = schemas.V2InferRequest(**infer_body(data=[]))
    answer, payload = v2.encode(request, OUTPUTS, "cifar10", "3")
    assert payload == b"" and [o["name"] for o in answer["outputs"]] == ["class_id", "label", "probabilities"]
    assert answer["outputs"][1] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]}
    request = schemas.V2InferRequest(**infer_body(data=[]), outputs=[
        {"name": "probabilities", "parameters": {"binary_data": True}}])
    answer, payload = v2.encode(request, OUTPUTS, "cifar10", "3")
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": 80}
    assert np.array_equal(np.frombuffer(payload, "<f4").reshape(2, 10), OUTPUTS["probabilities"])
    with pytest.raises(BadInput, match="unknown output 'logits'"):
        v2.encode(schemas.V2InferRequest(**infer_body(data=[]), outputs=[{"name": "logits"}]), OUTPUTS, "m", "1")


def test_the_upload_decodes_an_image_of_any_size_and_answers_the_top_five():
    big = np.asarray(Image.fromarray(PIXELS[0]).resize((64, 48)))
    assert page.decode("image/png", png(big)).shape == (1, 32, 32, 3)
    with pytest.raises(BadInput, match='multipart field "file"'):
        page.decode("text/plain", b"x")
    with pytest.raises(BadInput, match='multipart field "file"'):
        page.decode("multipart/form-data", None)
    probabilities = np.array([0.06, 0.5, 0, 0, 0.2, 0, 0.1, 0.04, 0.08, 0.02], dtype=np.float32)
    answer = page.encode(probabilities, tuple("abcdefghij"), 7)
    assert answer["model_version"] == 7
    assert [p["label"] for p in answer["predictions"]] == ["b", "e", "g", "i", "a"]
