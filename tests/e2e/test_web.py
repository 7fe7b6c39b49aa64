"""``lfdm serve``: a real server process over a saved pipeline answers the page, its examples and MLflow's
/invocations; in a real headless Chromium the page turns an example photo and a label into a playable video."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from lfdm.serving import encode_image

from .conftest import BIN, free_port, service_env, stop, wait_http
from .test_serving import post, tiny_pipeline

pytestmark = pytest.mark.slow
CHROMEDRIVER, CHROMIUM = shutil.which("chromedriver"), shutil.which("chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("web")
    saved = tiny_pipeline().save_pretrained(home / "pipeline")
    port, log = free_port(), home / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "lfdm"), "serve", str(saved), "--port", str(port)],
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=service_env(home, SERVING_MODEL_CONFIG='{"device": "cpu"}'),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", proc, 240, log)
        yield url
    finally:
        stop(proc)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return answer.read()


def test_page_examples_and_invocations(server):
    page = get(server).decode()
    assert '<form id="form">' in page
    # offline: no script, style, image or request from another host
    assert not re.search(r"""(src|href)=["']?(https?:)?//|fetch\(["'`]https?:|@import""", page)
    names = json.loads(get(f"{server}/examples"))
    assert "astronaut" in names
    photo = Image.open(io.BytesIO(get(f"{server}/examples/{names[0]}.png")))
    assert photo.size[0] == photo.size[1] and photo.mode == "RGB"

    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    body = {"dataframe_records": [{"image": encode_image(image), "label": "zoom in"}], "params": {"steps": 2}}
    status, answer = post(f"{server}/invocations", body)
    assert status == 200, answer
    row = answer["predictions"][0]
    flow = Image.open(io.BytesIO(base64.b64decode(row["flow"])))
    frames = np.asarray(row["video"])
    assert flow.width == flow.height * len(frames)  # one flow picture per frame, side by side
    status, answer = post(f"{server}/invocations", {**body, "params": {"steps": 0}})
    assert status == 400 and "steps" in answer["message"]


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMEDRIVER is None,
    reason="no chromedriver: install Chromium (Debian: apt install chromium chromium-driver)",
)
def test_page_plays_a_generated_video_in_chromium(server):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.execute_script("return document.getElementById('preview').naturalWidth > 0"))
        label = driver.find_element(By.ID, "label")
        label.clear()
        label.send_keys("zoom in")
        driver.find_element(By.ID, "steps").send_keys("2")
        driver.find_element(By.ID, "generate").click()
        playable = """const v = document.getElementById('video');
            return v.readyState >= 2 && v.duration > 0 && !v.error && v.videoWidth > 0;"""
        wait.until(lambda d: d.execute_script(playable))
        assert driver.execute_script("return document.getElementById('flow').naturalWidth") > 0
        assert driver.find_element(By.ID, "status").text.startswith("done in")
        driver.find_element(By.ID, "steps").clear()
        driver.find_element(By.ID, "steps").send_keys("0")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "steps" in d.find_element(By.ID, "status").text)  # the server's 400, shown
        assert driver.find_element(By.ID, "status").get_attribute("class") == "error"
    finally:
        driver.quit()
