"""The web page of ``sd_mlx.server`` in a real headless browser (Debian's ``chromium`` + ``chromium-driver``, driven
by selenium; ``.ci/run`` installs them): fill the form, generate with the tiny checkpoint, see the images with their
parameters and PNG downloads, watch the progress bar and the live preview of a long job, interrupt it. A
screenshot of the page is written to ``.cache/test-artifacts/server-page.png``.

Skipped, with the reason, where no browser or driver can be found. The server runs on 127.0.0.1 only; the browser
is started with networking features off (no sync, updates or QUIC) and a fresh profile.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install -e '.[server]')")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from _live_server import LiveServer  # noqa: E402
from sd_mlx.server import ServerConfig  # noqa: E402
from sd_mlx.validation import Limits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / ".cache" / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100")


def _browser_paths() -> tuple[str, str]:
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (apt-get install -y "
                    "chromium chromium-driver; .ci/run does this as root)")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="sd_mlx-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    try:
        d = webdriver.Chrome(service=Service(driver), options=options)
    except WebDriverException as e:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"the browser could not start: {e.msg}")
    d.set_page_load_timeout(60)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server(tiny_sd1, assets, tmp_path_factory):
    config = ServerConfig(model=str(tiny_sd1), output_dir=tmp_path_factory.mktemp("page") / "out",
                          preview_vae=assets / "taesd", limits=Limits(max_steps=1000, max_side=512, max_images=8))
    with LiveServer(config) as s:
        yield s


def _body(d, key: str) -> str:
    return d.find_element(By.TAG_NAME, "body").get_attribute(f"data-{key}") or ""


def _fill(d, field: str, value) -> None:
    e = d.find_element(By.ID, field)
    e.clear()
    e.send_keys(str(value))


def _cards(d):
    return d.find_elements(By.CSS_SELECTOR, "#gallery .card")


def test_page_generates_shows_progress_and_interrupts(browser, page_server):
    d = browser
    d.get(f"http://127.0.0.1:{page_server.port}/")
    WebDriverWait(d, 30).until(lambda d: _body(d, "state") == "idle")
    assert d.title == "sd_mlx"
    samplers = [o.text for o in Select(d.find_element(By.ID, "sampler")).options]
    assert "Euler a" in samplers and "DPM++ 2M Karras" in samplers
    assert Select(d.find_element(By.ID, "model")).first_selected_option.text == Path(page_server.server.model.source
                                                                                     ).name
    # a small job: two images appear, each with its parameters and a PNG download
    _fill(d, "prompt", "a red fox in the snow")
    _fill(d, "negative_prompt", "blurry")
    Select(d.find_element(By.ID, "sampler")).select_by_visible_text("DPM++ 2M Karras")
    for field, value in (("steps", 3), ("cfg_scale", 6), ("width", 64), ("height", 64), ("seed", 7),
                         ("batch_size", 2)):
        _fill(d, field, value)
    d.find_element(By.ID, "generate").click()
    WebDriverWait(d, 60).until(lambda d: len(_cards(d)) == 2 and _body(d, "state") == "idle")
    assert d.find_element(By.ID, "message").text.startswith("Done: 2 image(s)")
    texts = [c.find_element(By.CSS_SELECTOR, ".params").text for c in _cards(d)]
    for seed in (7, 8):
        assert any(f"Seed: {seed}," in t and "Sampler: DPM++ 2M Karras" in t and "Negative prompt: blurry" in t
                   for t in texts), texts
    link = _cards(d)[0].find_element(By.CSS_SELECTOR, "a.download")
    assert link.get_attribute("download").startswith("sd_mlx-") and link.get_attribute("href").startswith("blob:")
    png_b64 = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s)); });",
        link.get_attribute("href"))
    downloaded = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert downloaded.format == "PNG" and downloaded.size == (64, 64)
    card_text = _cards(d)[0].find_element(By.CSS_SELECTOR, ".params").text
    assert downloaded.info["parameters"] == card_text

    # a long job: the bar moves, the live preview appears, Interrupt stops it
    _fill(d, "steps", 1000)
    _fill(d, "batch_size", 1)
    d.find_element(By.ID, "generate").click()
    WebDriverWait(d, 60).until(lambda d: _body(d, "state") == "running")
    WebDriverWait(d, 60).until(lambda d: int(_body(d, "max-progress") or 0) >= 1 and int(_body(d, "previews") or 0) >= 2)
    preview = d.find_element(By.ID, "preview")
    assert preview.is_displayed() and preview.get_attribute("src").startswith("data:image/png;base64,")
    width = float(d.find_element(By.ID, "progress-bar").value_of_css_property("width").removesuffix("px"))
    assert width > 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "server-page-running.png"))
    d.find_element(By.ID, "interrupt").click()
    WebDriverWait(d, 60).until(lambda d: _body(d, "state") == "idle")
    assert d.find_element(By.ID, "message").text.startswith("Interrupted: 1 image(s)")
    assert len(_cards(d)) == 3
    assert page_server.server.worker.outcomes[-1] == ("txt2img", "interrupted")
    assert page_server.ok("GET", "/sdapi/v1/progress")["state"]["job_count"] == 0
    d.save_screenshot(str(ARTIFACTS / "server-page.png"))


def test_page_shows_validation_errors(browser, page_server):
    d = browser
    d.get(f"http://127.0.0.1:{page_server.port}/")
    WebDriverWait(d, 30).until(lambda d: _body(d, "state") == "idle")
    for field, value in (("steps", 2), ("width", 60), ("height", 64), ("seed", 1), ("batch_size", 1)):
        _fill(d, field, value)
    d.find_element(By.ID, "generate").click()
    WebDriverWait(d, 30).until(lambda d: "not a multiple of 8" in d.find_element(By.ID, "message").text)
    assert d.find_element(By.ID, "message").text == "width=60 is not a multiple of 8; use 56 or 64"
    assert _cards(d) == [] and _body(d, "state") == "idle"
