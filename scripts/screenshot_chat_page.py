"""Takes the screenshot of the chat page shown in README.md (``docs/chat-page.png``).

    python scripts/screenshot_chat_page.py [--out docs/chat-page.png] [--width 1100]

Serves the bundled demo model in-process (as ``rgemma serve`` does), opens the page in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``; selenium is given the
system's chromedriver, so it downloads nothing), has a short conversation branched at
its second turn, and saves the window with the settings panel open.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from rgemma.inference.engine import Engine, EngineConfig
from rgemma.io import demo
from rgemma.serving.app import ServerConfig, ServerThread, create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "system": "You write Python.",
    "temperature": "0.7",
    "top_k": "40",
    "max_tokens": "40",
    "seed": "1",
}


def browser(width: int, height: int) -> webdriver.Chrome:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--disable-gpu", "--hide-scrollbars", "--no-first-run"):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    # The page's own size, whatever the window's frame takes.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def answered(driver, count: int) -> None:
    """Waits until ``count`` turns are shown and the last answer is complete."""

    # Read in one script: the page re-renders its turns while we look.
    script = """const a = document.querySelectorAll('#turns li[data-turn] .answer');
        return a.length === arguments[0] && a[a.length - 1].getAttribute('aria-busy') === 'false'"""
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(script, count))


def converse(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model-name").text != "…")
    driver.find_element(By.ID, "settings-toggle").click()
    for name, value in SETTINGS.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    box = driver.find_element(By.ID, "message")
    for i, text in enumerate(("def fibonacci(n):", "class Stack:"), start=1):
        box.send_keys(text, Keys.ENTER)
        answered(driver, i)
    # Branch at the second turn: the "‹ 2 / 2 ›" control appears there.
    driver.find_element(By.CSS_SELECTOR, 'li[data-turn="2"] .branch').click()
    box.clear()
    box.send_keys("class Queue:", Keys.ENTER)
    answered(driver, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "chat-page.png"))
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = demo.load()
    with Engine(model, tokenizer, EngineConfig(max_batch=2)) as engine:
        app = create_app(engine, tokenizer, ServerConfig(model_name="demo"))
        with ServerThread(app) as url:
            driver = browser(args.width, args.height)
            try:
                converse(driver, url)
                driver.find_element(By.ID, "message").send_keys("Now write a test for it")
                driver.execute_script("document.getElementById('settings').scrollTop = 0")
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
