"""A real headless Chromium (Debian's `chromium` + `chromium-driver`, via Selenium) uses the Space app.

It loads the page, sends a Persian message, sees the streamed reply, saves a screenshot to
tests/artifacts/space/ (gitignored; CI keeps it as an artifact) and checks that the chat is right-to-left.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "space"))
from space_testing import PERSIAN_PROMPT, running_app, tiny_gguf  # noqa: E402,F401

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("HUBFORGE_ARTIFACTS", Path(__file__).parent / "artifacts")) / "space"
CHROMIUM, CHROMEDRIVER = "/usr/lib/chromium/chromium", "/usr/bin/chromedriver"  # the binary, not the noisy wrapper
EXAMPLES = ["سلام، حالت چطور است؟", "یک شعر کوتاه بنویس"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = "Chromium is not installed: `make browser-deps` (apt-get install -y chromium chromium-driver)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="hubforge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1200,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # explicit paths: Selenium Manager stays idle
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_browser_chat_is_right_to_left_and_streams_a_reply(browser, tiny_gguf, tmp_path):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    env = {"GGUF_PATH": str(tiny_gguf), "RTL": "1", "TITLE": "دموی فارسی", "EXAMPLES": json.dumps(EXAMPLES),
           "GGUF_REPO": "hubforge/tiny-test-GGUF", "MODEL_REPO": "hubforge/tiny-test"}
    with running_app(env, tmp_path / "app.log") as url:
        browser.get(url)
        box = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#msgbox textarea"))
        box.send_keys(PERSIAN_PROMPT)
        box.send_keys(Keys.ENTER)
        bot = WebDriverWait(browser, 60).until(
            lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]') if e.text.strip()])
        WebDriverWait(browser, 60).until(  # the reply is done when the stop button gives way to submit again
            lambda d: not d.find_elements(By.CSS_SELECTOR, "#msgbox .stop-button"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat-rtl.png"))

        direction = lambda css: browser.execute_script(  # noqa: E731
            "return getComputedStyle(document.querySelector(arguments[0])).direction", css)
        assert direction('[data-testid="bot"]') == "rtl"
        assert direction('[data-testid="user"]') == "rtl"
        assert direction("#msgbox textarea") == "rtl"
        assert direction("#examples .gallery-item") == "rtl"
        assert PERSIAN_PROMPT in browser.find_element(By.CSS_SELECTOR, '[data-testid="user"]').text
        assert bot[0].text.strip()
        page = browser.find_element(By.TAG_NAME, "body").text
        assert EXAMPLES[0] in page and "دموی فارسی" in page
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a")]
        assert any(h and h.endswith("/hubforge/tiny-test-GGUF") for h in links)
        assert (ARTIFACTS / "chat-rtl.png").stat().st_size > 10_000
