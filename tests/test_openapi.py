"""The OpenAPI document against the app's own URL map (a route left out of it
fails here), its validity, and the Swagger UI page at /docs, whose files come
from the swagger-ui-py wheel and nothing from another host."""

import re
import threading
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from openapi_spec_validator import validate

from serve import openapi, schemas
from serve.app import create_app
from serve.settings import Settings

NAME = "cifar10"
# What the OpenAPI path of a Flask rule is, worked out here independently of serve.openapi.
FLASK_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^:<>]+)>")
EXAMPLE_ARGUMENTS = {"name": NAME, "version": "1", "label": "stable"}


def make(tmp_path, **settings):
    # No model needed: nothing here runs one, and the document does not depend on it.
    return create_app(Settings(model_uri=str(tmp_path / NAME), poll_seconds=60, **settings))


@pytest.fixture(scope="module", params=[[], ["k1"]], ids=["open", "api-keys"])
def app(request, tmp_path_factory):
    app = make(tmp_path_factory.mktemp("models"), api_keys=request.param)
    yield app
    app.extensions["predictor"].backend.close()


@pytest.fixture(scope="module")
def spec(app):
    answer = app.test_client().get("/openapi.json")
    assert answer.status_code == 200
    return answer.json


def api_rules(app):
    return [rule for rule in app.url_map.iter_rules() if not openapi.is_static(rule.endpoint)]


def operations(spec):
    return {(path, method.upper()) for path, item in spec["paths"].items() for method in item}


def test_the_document_is_valid_openapi(spec):
    validate(spec)
    assert spec["openapi"] == "3.1.0"


def test_every_route_and_method_is_documented(app, spec):
    served = {(FLASK_VARIABLE.sub(r"{\1}", rule.rule), method)
              for rule in api_rules(app) for method in rule.methods - {"HEAD", "OPTIONS"}}
    missing = served - operations(spec)
    assert not missing, f"routes missing from /openapi.json (add the view to serve.openapi.ROUTES): {missing}"
    assert ("/v1/models/{name}/versions/{version}:predict", "POST") in served  # the converters and the suffix


def test_every_documented_operation_is_served(app, spec):
    adapter = app.url_map.bind("localhost")
    for path, method in operations(spec):
        declared = {p["name"] for p in spec["paths"][path][method.lower()]["parameters"]}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
        endpoint, _ = adapter.match(re.sub(r"{(\w+)}", lambda m: EXAMPLE_ARGUMENTS[m[1]], path), method=method)
        assert not openapi.is_static(endpoint), (path, method)


def test_every_entry_in_routes_belongs_to_a_view(app):
    assert set(openapi.ROUTES) == {app.view_functions[rule.endpoint].__name__ for rule in api_rules(app)}


def test_bodies_are_the_pydantic_models(spec):
    components = spec["components"]["schemas"]
    expected = schemas.PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert components["PredictRequest"] == expected
    predict = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictResponse"}
    assert set(components) >= {"PredictResponse", "Prediction", "V2InferRequest", "V2Tensor", "Error", "Health"}
    parameter = predict["parameters"][0]
    assert parameter == {"name": "name", "in": "path", "required": True, "description": "the model's name",
                       "schema": {"type": "string", "pattern": "^[^/:]+$"}, "example": NAME}


def test_the_sagemaker_routes_are_documented(spec):
    assert "get" in spec["paths"]["/ping"] and "415" in spec["paths"]["/invocations"]["post"]["responses"]


def test_api_keys_are_documented_where_they_are_asked_for(app, spec):
    keys = bool(app.extensions["settings"].api_keys)
    assert ("securitySchemes" in spec["components"]) == keys
    predict = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert ("security" in predict, "401" in predict["responses"]) == (keys, keys)
    assert "security" not in spec["paths"]["/healthz"]["get"] and "security" not in spec["paths"]["/v2"]["get"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for key, value in attrs if key in ("src", "href")]


def test_the_docs_page_and_its_files_are_served_without_a_key_and_from_here_only(app):
    client = app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert not re.search(r"https?:|//[a-z]", html), "the page must load nothing from another host"
    assert 'url: "openapi.json"' in html and urljoin("/docs", "openapi.json") == "/openapi.json"
    links = Links()
    links.feed(html)
    types = {urljoin("/docs", url): client.get(urljoin("/docs", url)).mimetype for url in links.urls}
    assert types == {"/docs/swagger-ui.css": "text/css", "/docs/favicon-32x32.png": "image/png",
                     "/docs/swagger-ui-bundle.js": "text/javascript"}
    assert all(client.get(url).status_code == 200 for url in types)
    assert client.get("/openapi.json").status_code == 200



@pytest.mark.slow
def test_swagger_ui_renders_every_operation_in_a_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    app = make(tmp_path, api_keys=["k1"])
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}"
        expected = len(operations(app.test_client().get("/openapi.json").json))
        browser.get(url + "/docs")
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == expected)
        assert browser.find_elements(By.CSS_SELECTOR, ".btn.authorize")  # the keys can be given in the UI
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(url + "/") for name in loaded), loaded
    finally:
        httpd.shutdown()
        app.extensions["predictor"].backend.close()
