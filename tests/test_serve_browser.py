"""The page at GET /, driven in a real headless browser (the system's Chromium through Selenium): each of the
three forms streams the answer `model.generate` gives and shows time to first token and tokens/s.

Skipped, with the reason, where Selenium, Chromium or chromedriver is missing (Debian:
`apt-get install chromium chromium-driver`; `.ci/run` installs them). Nothing is downloaded.
"""

import os
import re
import shutil
import tempfile

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from mu.data.tasks import encode_source, make_example  # noqa: E402
from mu.serve.app import ServeConfig, Server, serve_in_thread  # noqa: E402
from tests.serve_helpers import printable_vlm, reference  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1400"]


def _browser_paths():
    chromium = os.environ.get("MU_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("MU_CHROMEDRIVER") or shutil.which("chromedriver")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser tests need the selenium package (pip install selenium; `make install` has it)")
    chromium, driver = _browser_paths()
    if chromium is None or driver is None:
        pytest.skip("browser tests need Chromium and chromedriver on PATH (Debian: apt-get install chromium "
                    "chromium-driver), or MU_CHROMIUM / MU_CHROMEDRIVER set to them")
    profile = tempfile.mkdtemp(prefix="mu-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    try:
        drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except Exception as e:  # a browser that cannot start here is an environment problem, said as such
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium at {chromium} did not start under chromedriver {driver}: {str(e).splitlines()[0]}")
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served():
    vlm = printable_vlm()
    with serve_in_thread(Server(vlm, vlm.tokenizer, ServeConfig(model_name="tiny-vlm")).app) as base:
        yield vlm, base


def _text(drv, element_id):
    return drv.find_element("id", element_id).get_property("textContent")


def _run(drv, max_tokens=10):
    from selenium.webdriver.support.ui import WebDriverWait

    box = drv.find_element("id", "max-tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    drv.find_element("id", "run").click()
    WebDriverWait(drv, 60).until(lambda d: _text(d, "status") in ("done", "failed"))
    return _text(drv, "output")


def _check_stats(drv, n_tokens):
    assert re.fullmatch(r"first token: \d+\.\d{3} s", _text(drv, "ttft")), _text(drv, "ttft")
    assert _text(drv, "tokens") == f"tokens: {n_tokens}"
    assert re.fullmatch(r"tokens/s: \d+\.\d", _text(drv, "tps")), _text(drv, "tps")


def test_page_streams_all_three_tasks(browser, served, tmp_path):
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    vlm, base = served
    tok, eos = vlm.tokenizer, vlm.tokenizer.eos_token_id
    drv = browser
    drv.get(base + "/")
    WebDriverWait(drv, 30).until(lambda d: "tiny-vlm" in _text(d, "model"))
    assert "vision" in _text(drv, "model")

    # reading comprehension: the squad_v2 prompt
    context, question = "The Nile flows north into the sea.", "Where does the Nile flow?"
    drv.find_element("id", "context").send_keys(context)
    drv.find_element("id", "question").send_keys(question)
    source = make_example("squad_v2", {"context": context, "question": question, "answers": []}).source
    want = reference(vlm, encode_source(tok, source)[0], 10, eos=eos)
    assert _run(drv) == tok.decode(want, skip_special_tokens=True) and _text(drv, "error") == ""
    _check_stats(drv, len(want))

    # free prompt
    drv.find_element("id", "mode-prompt").click()
    drv.find_element("id", "prompt").send_keys("Once upon a time")
    want = reference(vlm, tok("Once upon a time", add_special_tokens=False)["input_ids"], 12, eos=eos)
    assert _run(drv, 12) == tok.decode(want, skip_special_tokens=True)
    _check_stats(drv, len(want))

    # image + question
    path = tmp_path / "red.png"
    Image.new("RGB", (48, 40), (220, 40, 40)).save(path)
    drv.find_element("id", "mode-image").click()
    drv.find_element("id", "image-file").send_keys(str(path))
    WebDriverWait(drv, 30).until(lambda d: d.find_element("id", "preview").get_attribute("src").startswith("data:"))
    drv.find_element("id", "image-question").send_keys("What colour is the picture?")
    ids = tok(vlm.prompt("What colour is the picture?"), add_special_tokens=False)["input_ids"]
    want = reference(vlm, ids, 10, eos=eos, images=[vlm.processor(Image.open(path))])
    assert _run(drv) == tok.decode(want, skip_special_tokens=True)
    _check_stats(drv, len(want))

    # a refused request shows the server's message
    drv.find_element("id", "mode-prompt").click()
    drv.find_element("id", "prompt").clear()
    _run(drv)
    assert _text(drv, "status") == "failed" and _text(drv, "error").startswith("prompt: empty")
