"""The upload page at `/`, driven in a real headless browser (Debian's
chromium and chromium-driver, through selenium) against the service
listening on 127.0.0.1: a person picks an image and sees the label the
model gives it, with the top-5 classes; a file that is not an image shows
the service's error. Ten real CIFAR-10 photos on the page do the same with
one click, and ship inside the built package."""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import pixels, png, url_ready, wait_until

pytestmark = pytest.mark.slow  # a real chromium for every test (and a wheel built for one)

NAME = "cifar10"
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "serve" / "static" / "samples"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def version_dir(exported_model):
    return exported_model / "1"


def serving(version_dir: Path, **settings):
    """The service on 127.0.0.1 (a free port), served for real by werkzeug; yields its base URL."""
    from werkzeug.serving import make_server

    from serve.app import create_app
    from serve.settings import Settings

    app = create_app(Settings(model_uri=str(version_dir.parent), poll_seconds=0.2, **settings))
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="serve-page-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    wait_until(lambda: url_ready(f"{url}/readyz"), timeout=60, what="/readyz to answer 200")
    yield url
    httpd.shutdown()
    thread.join(timeout=10)
    app.extensions["predictor"].backend.close()


@pytest.fixture(scope="module")
def server(browser, version_dir):
    yield from serving(version_dir)


KEY = "page-test-key"


@pytest.fixture(scope="module")
def keyed_server(browser, version_dir):
    """The same service with SERVE_API_KEYS on."""
    yield from serving(version_dir, api_keys=[KEY])


@pytest.fixture
def page(browser, server):
    """The page, freshly loaded."""
    browser.get(f"{server}/")
    assert browser.title == "CIFAR-10 classifier"
    return browser


def post_image(url: str, data: bytes, key: str | None = None) -> dict:
    headers = {"Content-Type": "image/png", **({"X-API-Key": key} if key else {})}
    request = urllib.request.Request(f"{url}/predict", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # a 4xx's body is the server's {"error": ...}
        return json.load(exc)


def savedmodel_label(version_dir: Path, image_path: Path) -> str:
    """What the exported SavedModel itself says, for the image resized to 32x32 the way the service does."""
    import tensorflow as tf

    with Image.open(image_path) as image:
        small = image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=None)
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    probabilities = signature(images=tf.constant(np.asarray(small, np.uint8)[None]))["probabilities"].numpy()[0]
    labels = (version_dir / "assets" / "labels.txt").read_text().split()
    return labels[int(np.argmax(probabilities))]


def wait_for_text(driver, element_id: str, timeout: float = 30) -> str:
    from selenium.webdriver.common.by import By

    return wait_until(lambda: driver.find_element(By.ID, element_id).text.strip(), timeout=timeout,
                      what=f"text in #{element_id}")


def test_uploading_an_image_shows_the_models_label_and_top_five(page, server, version_dir, tmp_path):
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(3)
    pixels = np.clip(np.linspace(0, 255, 64)[None, :, None] + rng.normal(0, 40, (64, 64, 3)), 0, 255)
    image_path = tmp_path / "photo.png"
    Image.fromarray(pixels.astype(np.uint8)).save(image_path)

    page.find_element(By.ID, "file").send_keys(str(image_path))
    shown = wait_for_text(page, "label")

    answer = post_image(server, image_path.read_bytes())
    assert shown == answer["predictions"][0]["label"]
    assert shown == savedmodel_label(version_dir, image_path)

    rows = page.find_elements(By.CSS_SELECTOR, "#classes .row")
    assert len(rows) == 5
    for row, expected in zip(rows, answer["predictions"], strict=True):
        label, bar, percent = row.find_elements(By.XPATH, "./*")
        assert label.text == expected["label"]
        assert percent.text == f"{100 * expected['probability']:.1f}%"
        assert "bar" in bar.get_attribute("class")
    assert page.find_element(By.ID, "version").text == f"model version {answer['model_version']}"
    assert page.find_element(By.ID, "error").text == ""
    # Laid out one below the other: the drop zone (a <label>) must not overlap the text above or the preview.
    intro, drop, preview = (page.find_element(By.CSS_SELECTOR, css) for css in ("body > p", "#drop", "#preview"))
    assert preview.is_displayed()
    assert intro.rect["y"] + intro.rect["height"] <= drop.rect["y"]
    assert drop.rect["y"] + drop.rect["height"] <= preview.rect["y"]
    if os.environ.get("SERVE_PAGE_SCREENSHOT"):  # e.g. /tmp/page.png, to look at the page
        page.save_screenshot(os.environ["SERVE_PAGE_SCREENSHOT"])


def test_uploading_a_file_that_is_not_an_image_shows_the_error(page, tmp_path):
    from selenium.webdriver.common.by import By

    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image\n")

    page.find_element(By.ID, "file").send_keys(str(not_image))
    error = wait_for_text(page, "error")

    assert "cannot decode the image: it is not a PNG or JPEG file" in error
    assert "BytesIO" not in error  # no internals in what a person reads
    assert page.find_element(By.ID, "label").text == ""
    assert page.find_elements(By.CSS_SELECTOR, "#classes .row") == []


def png_file(path: Path, seed: int) -> Path:
    path.write_bytes(png(pixels(1, seed, side=64)[0]))
    return path


def test_an_error_after_a_prediction_clears_the_old_prediction(page, tmp_path):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "file").send_keys(str(png_file(tmp_path / "first.png", 7)))
    assert wait_for_text(page, "label")
    (tmp_path / "second.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    page.find_element(By.ID, "file").send_keys(str(tmp_path / "second.png"))

    assert "cannot decode the image" in wait_for_text(page, "error")
    # The first image's answer must not stay on screen beside the second one's error.
    assert page.find_element(By.ID, "label").text == ""
    assert page.find_elements(By.CSS_SELECTOR, "#classes .row") == []
    assert page.find_element(By.ID, "version").text == ""


def test_a_service_that_cannot_be_reached_is_reported(page, tmp_path):
    from selenium.webdriver.common.by import By

    page.execute_cdp_cmd("Network.enable", {})
    page.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/predict"]})
    try:
        page.find_element(By.ID, "file").send_keys(str(png_file(tmp_path / "photo.png", 8)))
        assert "no answer" in wait_for_text(page, "error")
    finally:
        page.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        page.execute_cdp_cmd("Network.disable", {})
    assert page.find_element(By.ID, "label").text == ""


def sample_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (32, 32)
        return np.asarray(image.convert("RGB"))


def test_every_sample_photo_is_served_as_a_32x32_png(server):
    for name in CLASSES:
        with urllib.request.urlopen(f"{server}/static/samples/{name}.png", timeout=10) as response:
            assert response.status == 200
            assert response.headers.get_content_type() == "image/png"
            pixels = sample_pixels(response.read())
        # A photograph, not a flat or noise placeholder: neighbouring pixels are alike, but the image varies.
        assert pixels.std() > 20
        assert np.abs(np.diff(pixels.astype(int), axis=1)).mean() < pixels.std()


def test_the_page_offers_one_sample_button_per_class(page, version_dir):
    from selenium.webdriver.common.by import By

    buttons = page.find_elements(By.CSS_SELECTOR, "#samples button.sample")
    labels = (version_dir / "assets" / "labels.txt").read_text().split()
    assert [b.get_attribute("data-sample") for b in buttons] == labels == CLASSES  # one per class, in label order
    for button, name in zip(buttons, CLASSES, strict=True):
        image = button.find_element(By.TAG_NAME, "img")
        assert name in image.get_attribute("alt")
        assert button.text == name  # the visible caption is the photo's true class
        assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 32
        assert image.value_of_css_property("image-rendering") == "pixelated"
        assert image.size["width"] > 32  # shown upscaled


def shown_pixels(driver, element_id: str) -> np.ndarray:
    """The pixels of an <img> as the browser decoded them, at its natural size."""
    flat = driver.execute_script(
        """const img = document.getElementById(arguments[0]);
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);""", element_id)
    return np.array(flat, np.uint8).reshape(32, 32, 4)[..., :3]


@pytest.mark.parametrize("name, how", [("cat", "click"), ("ship", "keyboard")])
def test_choosing_a_sample_shows_its_preview_and_the_models_answer(page, server, version_dir, name, how):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    button = page.find_element(By.CSS_SELECTOR, f'#samples button[data-sample="{name}"]')
    if how == "click":
        button.click()
    else:
        button.send_keys(Keys.ENTER)  # a <button>: reachable with Tab, pressed with Enter
    shown = wait_for_text(page, "label")

    data = (SAMPLES / f"{name}.png").read_bytes()
    answer = post_image(server, data)
    assert shown == answer["predictions"][0]["label"]
    assert shown == savedmodel_label(version_dir, SAMPLES / f"{name}.png")
    # The whole top 5, to the shown decimal: the page sent this photo, not some other image.
    rows = [row.text.split("\n") for row in page.find_elements(By.CSS_SELECTOR, "#classes .row")]
    assert rows == [[p["label"], f"{100 * p['probability']:.1f}%"] for p in answer["predictions"]]
    assert page.find_element(By.ID, "error").text == ""

    preview = page.find_element(By.ID, "preview")
    WebDriverWait(page, 10).until(lambda d: d.execute_script("return arguments[0].complete", preview))
    assert preview.is_displayed() and name in preview.get_attribute("alt")
    assert preview.size["width"] == 128  # upscaled like the samples, not a 32-pixel speck
    assert np.array_equal(shown_pixels(page, "preview"), sample_pixels(data))


def test_the_built_package_carries_the_page_and_its_sample_photos(tmp_path):
    """The service image installs the package (`pip install .`), not the source tree, and the editable
    install the tests run from would find files the wheel lacks: so build the wheel and look inside."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in the virtualenv")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in {name.split(".")[0] for name in found["include"]}:  # a copy: the build leaves nothing here
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")

    # The service's own start-up needs the code both images share, too.
    expected = ["serve/static/index.html", "serve/static/samples/README.md", "common/tfquiet.py",
                "common/images.py", "common/s3.py"]
    expected += [f"serve/static/samples/{name}.png" for name in CLASSES]
    with zipfile.ZipFile(wheel) as archive:
        missing = [path for path in expected if path not in archive.namelist()]
        assert not missing, f"not in the wheel (pyproject.toml [tool.setuptools.package-data]): {missing}"
        for path in expected:
            assert archive.read(path) == (ROOT / path).read_bytes()


def test_without_api_keys_the_page_asks_for_no_key(page):
    from selenium.webdriver.common.by import By

    assert not page.find_element(By.ID, "key-row").is_displayed()


def test_with_api_keys_the_page_asks_for_a_key_and_sends_it(browser, keyed_server, version_dir):
    from selenium.webdriver.common.by import By

    browser.get(f"{keyed_server}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    row, field = browser.find_element(By.ID, "key-row"), browser.find_element(By.ID, "api-key")
    # Before any prediction has failed, the page says a key is needed.
    assert row.is_displayed() and "needs an API key" in row.text and field.get_attribute("value") == ""
    cat = (SAMPLES / "cat.png").read_bytes()

    # Keys turned on after the page was loaded: the 401 itself brings the field back, ready to type in.
    browser.execute_script("arguments[0].hidden = true", row)
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="cat"]').click()
    assert wait_for_text(browser, "error") == post_image(keyed_server, cat)["error"]
    assert row.is_displayed() and browser.switch_to.active_element == field

    field.send_keys("not-the-key")
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="cat"]').click()
    refused = post_image(keyed_server, cat, key="not-the-key")
    assert wait_for_text(browser, "error") == refused["error"] and "API key" in refused["error"]
    assert browser.find_element(By.ID, "label").text == ""

    field.clear()
    field.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="cat"]').click()
    shown = wait_for_text(browser, "label")
    assert shown == post_image(keyed_server, cat, key=KEY)["predictions"][0]["label"]
    assert shown == savedmodel_label(version_dir, SAMPLES / "cat.png")
    assert browser.find_element(By.ID, "error").text == ""

    # Kept for the tab: after a reload the key is still there, and an upload uses it too.
    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert browser.execute_script("return sessionStorage.getItem('cifar-serve-api-key')") == KEY
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "ship.png"))
    assert wait_for_text(browser, "label") == post_image(keyed_server, (SAMPLES / "ship.png").read_bytes(),
                                                         key=KEY)["predictions"][0]["label"]

