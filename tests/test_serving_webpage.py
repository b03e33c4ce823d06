"""The upload page at `/` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium through the system chromedriver, never a downloaded one."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from cvops.testing import encode, headless_chromium

pytestmark = pytest.mark.service



@pytest.fixture
def browser(tmp_path):
    "Headless Chromium through the system chromedriver; quit when the test ends, pass or fail."
    yield from headless_chromium(tmp_path, "1100,900", 30)


def test_upload_page_classifies_an_image_and_shows_the_overlay(browser, service_root, service_factory, trained_models, tmp_path):
    "Upload a Fashion-MNIST test image through the page: the class shown is the API's, and the GradCAM overlay renders."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    svc = service_factory(service_root["root"])
    svc.wait_workers_ready(service_root["a"])
    _, xt, _, _ = trained_models["a"]
    for i in range(20):  # a test image whose GradCAM is not flat (a tiny model gives some all-zero maps), for a telling screenshot
        data = encode(xt[i], "PNG")
        api = svc.predict(data)
        assert api.status_code == 200, api.text
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(api.json()["heatmap"]))))
        if len(np.unique(heat.reshape(-1, heat.shape[-1]), axis=0)) > 1: break
    image = tmp_path / "upload.png"
    image.write_bytes(data)
    expected = api.json()["top_class"]

    browser.get(svc.url("/"))
    assert browser.title == "cvops: classify an image"
    WebDriverWait(browser, 20).until(lambda d: service_root["a"] in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(image))   # the hidden <input type=file>
    def shown(d):
        if d.find_element(By.ID, "error").text: pytest.fail(f"the page shows an error: {d.find_element(By.ID, 'error').text}")
        t = d.find_element(By.ID, "top").text
        return t if t not in ("", "Classifying...") else None
    top = WebDriverWait(browser, 30).until(shown)
    overlay = browser.find_element(By.ID, "overlay")
    WebDriverWait(browser, 20).until(lambda d: (overlay.get_attribute("src") or "").startswith("data:image/png;base64,")
                                     and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0)
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    shot = tmp_path / "upload-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000

    assert top == expected, f"the page shows {top!r}, the API says {expected!r} (screenshot {shot})"
    assert width > 0 and height > 0
    assert overlay.get_attribute("alt") == f"GradCAM overlay for {expected}"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert 1 <= len(bars) <= 5 and bars[0].find_element(By.CSS_SELECTOR, "span.name").text == expected
    meta = browser.find_element(By.ID, "meta").text
    assert service_root["a"] in meta and "request" in meta
    assert browser.find_element(By.ID, "error").text == ""
    # the page's upload was logged like the API calls: the last two predictions are of the same image
    svc.stop()
    import sqlalchemy as sa
    from cvops.predlog.schema import predictions
    eng = sa.create_engine(f"sqlite:///{service_root['root'] / 'var' / 'cvops.db'}")
    with eng.connect() as c:
        rows = c.execute(sa.select(predictions.c.top_class, predictions.c.image_sha256)   # in request order: two workers
                         .order_by(predictions.c.created_on)).all()                          # insert in their own order
    eng.dispose()
    assert len(rows) == i + 2 and rows[-1] == rows[-2] and rows[-1][0] == expected, rows
