"""The README's picture of ``lfdm serve``'s page: serve a model, generate one video in headless Chromium, save
the window as a PNG.

    python tools/web_screenshot.py MODEL --label "zoom in" --example astronaut --out docs/img/web.png

MODEL is what ``lfdm serve`` takes (a saved pipeline folder or an MLflow model URI). Needs Chromium and
chromedriver (``make browser``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lfdm serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"{url} did not answer in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--label", default="zoom in")
    parser.add_argument("--example", default="astronaut", help="one of the page's example photos")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--out", type=Path, default=Path("docs/img/web.png"))
    args = parser.parse_args()

    lfdm = shutil.which("lfdm") or sys.exit("no lfdm on PATH: activate the project's venv")
    server = subprocess.Popen([lfdm, "serve", args.model, "--port", str(args.port)])
    url = f"http://127.0.0.1:{args.port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,620"):
        options.add_argument(flag)
    try:
        wait_for(url + "ping", server)
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 600)
            wait.until(
                lambda d: d.find_elements(By.CSS_SELECTOR, f"#examples img[data-name='{args.example}']")
            )
            driver.find_element(By.CSS_SELECTOR, f"#examples img[data-name='{args.example}']").click()
            label = driver.find_element(By.ID, "label")
            label.clear()
            label.send_keys(args.label)
            if args.steps:
                driver.find_element(By.ID, "steps").send_keys(str(args.steps))
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text not in ("", "generating…"))
            driver.execute_script(
                "const v = document.getElementById('video'); v.pause(); v.currentTime = v.duration;"
            )
            time.sleep(1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}: {driver.find_element(By.ID, 'status').text}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
