"""The chat page of ``rgemma serve`` (``GET /``) in a real browser: headless Chromium driven
by selenium against a live server over the bundled demo model.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them every test here skips, saying so. Nothing downloads a browser: the system's
chromedriver is given to selenium, so selenium-manager never runs.

The tests share one browser and one server and each starts from a freshly loaded page.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import httpx
import pytest

from helpers import metrics, wait_until
from rgemma.inference.engine import Engine, EngineConfig
from rgemma.serving.app import ServerConfig, ServerThread, create_app
from rgemma.serving.web import WEB_PATHS

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install -e '.[test]')"
)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
if not (CHROMEDRIVER and CHROMIUM):
    pytest.skip(
        "the chat page test needs a browser: apt-get install chromium chromium-driver "
        f"(chromium: {CHROMIUM or 'not found'}, chromedriver: {CHROMEDRIVER or 'not found'})",
        allow_module_level=True,
    )

pytestmark = pytest.mark.usefixtures("one_thread")

API_KEY = "sesame"
WAIT_S = 30


# ================================================================== fixtures
@pytest.fixture(scope="module")
def engine():
    from rgemma.io import demo

    model, tok = demo.load()
    # rgemma serve's scheduler (a smaller prefix cache: these prompts are short)
    with Engine(model, tok, EngineConfig(max_batch=4, prefix_cache_bytes=2**24)) as e:
        yield e


@pytest.fixture(scope="module")
def url(engine):
    with ServerThread(create_app(engine, engine.tokenizer, ServerConfig(model_name="demo"))) as u:
        yield u


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,900")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# =================================================================== helpers
def wait(driver, condition, what: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        condition, message=f"timed out waiting for {what}"
    )


def open_page(driver, url: str, **settings) -> None:
    """Loads the page afresh, waits for the model name, then fills in the settings."""
    driver.get(url)
    driver.execute_script("localStorage.clear()")  # the settings of the test before
    driver.refresh()
    wait(driver, lambda d: d.find_element(By.ID, "model-name").text not in ("…", ""), "model")
    if settings:
        fill_settings(driver, **settings)


def fill_settings(driver, **settings) -> None:
    """Types the settings into the settings panel (opened and closed again)."""
    driver.find_element(By.ID, "settings-toggle").click()
    for name, value in settings.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "settings-toggle").click()


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "message")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def turns(driver) -> list[dict]:
    """The turns shown: user text, answer, status, branch counter."""
    return js(
        driver,
        """return [...document.querySelectorAll('#turns li[data-turn]')].map(li => ({
            user: li.querySelector('.user-text').textContent,
            answer: li.querySelector('.answer').textContent,
            status: li.querySelector('.turn-status').textContent,
            busy: li.querySelector('.answer').getAttribute('aria-busy'),
            branches: li.querySelector('.branches').hidden
                ? '' : li.querySelector('.branch-count').textContent}))""",
    )


def wait_answered(driver, count: int) -> list[dict]:
    """Waits for ``count`` turns with the last one's answer complete."""

    def done(d):
        shown = turns(d)
        ok = len(shown) == count and shown[-1]["busy"] == "false"
        return shown if ok and d.find_element(By.ID, "stop").get_attribute("disabled") else False

    shown = wait(driver, done, f"answer {count}")
    assert not shown[-1]["status"].startswith("error"), shown[-1]["status"]
    return shown


def prompt_tokens_read(url: str) -> float:
    """Prompt tokens the server has read, computed or from its prefix cache: what clients
    sent it."""
    m = metrics(url)
    return m["rgemma_prompt_tokens_total"] + m["rgemma_prompt_tokens_cached_total"]


def token_count(url: str, messages: list[dict]) -> int:
    return httpx.post(url + "/tokenize", json={"messages": messages}, timeout=10).json()["count"]


def state_ids(url: str) -> set[str]:
    return {s["id"] for s in httpx.get(url + "/v1/states", timeout=10).json()["data"]}


# ===================================================================== tests
def test_page_and_static_files_need_no_key(engine):
    """The page's files are open; the API behind it keeps its key."""
    app = create_app(engine, engine.tokenizer, ServerConfig(model_name="demo", api_key=API_KEY))
    with ServerThread(app) as u:
        for path in WEB_PATHS:
            r = httpx.get(u + path)
            assert r.status_code == 200, path
            assert "script-src 'self'" in r.headers["content-security-policy"]
        assert httpx.get(u + "/").headers["content-type"].startswith("text/html")
        assert httpx.get(u + "/static/chat.js").headers["content-type"].startswith("text/javas")
        assert httpx.get(u + "/v1/models").status_code == 401
        assert httpx.get(u + "/static/../app.py").status_code in (401, 404)
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(u + "/static/other.js", headers=auth).status_code == 404


def test_send_streams_the_answer(browser, url):
    """Shift+Enter is a new line, Enter sends; the answer grows while it streams; the model
    name and the speed of the answer are shown."""
    open_page(browser, url, max_tokens=48, temperature=0)
    assert browser.find_element(By.ID, "model-name").text == "demo"
    box = browser.find_element(By.ID, "message")
    box.send_keys("def fib(n):", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "    return n")
    assert box.get_attribute("value") == "def fib(n):\n    return n" and turns(browser) == []
    # Every length the answer had on screen, recorded by the page itself as it changes.
    js(
        browser,
        """window.lengths = [];
        new MutationObserver(() => {
            const a = document.querySelector('#turns li[data-turn] .answer');
            if (a) window.lengths.push(a.textContent.length);
        }).observe(document.getElementById('turns'),
                   {subtree: true, childList: true, characterData: true});""",
    )
    box.send_keys(Keys.ENTER)
    (turn,) = wait_answered(browser, 1)
    assert turn["user"] == "def fib(n):\n    return n" and turn["answer"]
    lengths = [n for n in js(browser, "return window.lengths") if n]
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths), lengths  # it grew, piecewise
    assert lengths[-1] == len(turn["answer"])
    # Screen readers get the answer once, when it is complete.
    assert js(browser, "return document.getElementById('announcer').textContent") == (
        "Answer: " + turn["answer"]
    )
    speed = browser.find_element(By.ID, "speed").text
    assert re.search(r"last answer: \d+ tokens, [\d.]+ tok/s", speed), speed
    assert box.get_attribute("value") == ""


def test_stop_a_long_answer(browser, url):
    """Esc (and the Stop button) end a long answer at once; the server cancels it."""
    open_page(browser, url, max_tokens=2000)
    before = metrics(url)['rgemma_requests_total{outcome="cancelled"}']
    send(browser, "class Parser:")
    wait(browser, lambda d: len(turns(d)[0]["answer"]) > 20, "a streaming answer")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    turn = wait(browser, lambda d: (t := turns(d)[0])["status"] == "stopped" and t, "stopped")
    time.sleep(0.5)
    assert turns(browser)[0]["answer"] == turn["answer"]  # no longer growing
    assert len(turn["answer"]) < 2000
    wait(
        browser,
        lambda _: metrics(url)['rgemma_requests_total{outcome="cancelled"}'] > before,
        "the server to cancel the request",
    )
    assert wait_until(lambda: metrics(url)["rgemma_active_slots"] == 0)
    # The Stop button does the same; the turn after a stopped one works (sent in full).
    send(browser, "def main():")
    wait(browser, lambda d: len(turns(d)) == 2 and len(turns(d)[1]["answer"]) > 5, "answer 2")
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: turns(d)[1]["status"] == "stopped", "the second stop")
    assert browser.find_element(By.ID, "save").get_attribute("disabled")  # no state to save


def test_branch_without_reading_the_conversation_again(browser, url):
    """ "Edit & branch" at turn 2 sends only the edited message (from the state after turn
    1); at turn 1 it starts over; the earlier branches stay reachable with ‹ ›."""
    open_page(browser, url, max_tokens=16, temperature=0)
    send(browser, "import os")
    wait_answered(browser, 1)
    send(browser, "import sys")
    first = wait_answered(browser, 2)

    read = prompt_tokens_read(url)
    browser.find_element(By.CSS_SELECTOR, 'li[data-turn="2"] .branch').click()
    box = browser.switch_to.active_element
    assert box.get_attribute("id") == "message" and box.get_attribute("value") == "import sys"
    box.clear()
    box.send_keys("import re", Keys.ENTER)
    second = wait_answered(browser, 2)
    sent = prompt_tokens_read(url) - read
    conversation = [
        {"role": "user", "content": "import os"},
        {"role": "assistant", "content": first[0]["answer"]},
        {"role": "user", "content": "import re"},
    ]
    # Only the new user turn was read: not the first turn again.
    assert sent <= token_count(url, conversation[2:]) + 2 < token_count(url, conversation)
    assert second[0] == first[0] and second[1]["user"] == "import re"
    assert second[1]["branches"] == "2 / 2"

    browser.find_element(By.CSS_SELECTOR, 'li[data-turn="2"] .prev-branch').click()
    assert turns(browser)[1] == {**first[1], "branches": "1 / 2"}
    assert browser.switch_to.active_element.get_attribute("class") == "next-branch"  # focus kept
    browser.switch_to.active_element.send_keys(Keys.ENTER)  # the keyboard moves back
    assert turns(browser)[1]["user"] == "import re"

    # At the first turn: a new conversation beside the old one.
    browser.find_element(By.CSS_SELECTOR, 'li[data-turn="1"] .branch').click()
    box = browser.switch_to.active_element
    box.clear()
    box.send_keys("import json", Keys.ENTER)
    (new,) = wait_answered(browser, 1)
    assert new["user"] == "import json" and new["branches"] == "2 / 2"
    browser.find_element(By.CSS_SELECTOR, 'li[data-turn="1"] .prev-branch').click()
    assert [t["user"] for t in turns(browser)] == ["import os", "import re"]


def test_save_and_load_a_session(browser, url, downloads):
    """Save downloads the state after the last turn with the conversation inside; after a
    reload, Load shows the conversation again and the next turn continues from the loaded
    state (only the new message is read)."""
    open_page(browser, url, max_tokens=16, temperature=0, system="You write Python.")
    send(browser, "def add(a, b):")
    wait_answered(browser, 1)
    send(browser, "def sub(a, b):")
    shown = wait_answered(browser, 2)
    states_before = state_ids(url)
    browser.find_element(By.ID, "save").click()
    saved = wait(
        browser,
        lambda _: [p for p in downloads.glob("rgemma-chat-*.safetensors")],
        "the download",
    )[0]
    assert wait_until(lambda: state_ids(url) == states_before)  # its copy is deleted again

    browser.refresh()
    wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "demo", "reload")
    assert turns(browser) == []
    browser.find_element(By.ID, "load-file").send_keys(str(saved))
    restored = wait(browser, lambda d: len(turns(d)) == 2 and turns(d), "the loaded session")
    assert [(t["user"], t["answer"]) for t in restored] == [(t["user"], t["answer"]) for t in shown]
    system = browser.find_element(By.CSS_SELECTOR, "#turns .message.system").text
    assert "You write Python." in system

    read = prompt_tokens_read(url)
    send(browser, "def mul(a, b):")
    after = wait_answered(browser, 3)
    assert after[2]["answer"] and prompt_tokens_read(url) - read <= (
        token_count(url, [{"role": "user", "content": "def mul(a, b):"}]) + 2
    )
    saved.unlink()

    # A state file that holds no conversation of the page: refused, nothing changes.
    other = httpx.post(url + "/v1/states", json={"prompt": "import os"}).json()
    plain = downloads / "plain.safetensors"
    plain.write_bytes(httpx.get(f"{url}/v1/states/{other['id']}/file").content)
    httpx.delete(f"{url}/v1/states/{other['id']}")
    states_before = state_ids(url)
    browser.find_element(By.ID, "load-file").send_keys(str(plain))
    error = wait(browser, lambda d: d.find_element(By.ID, "error").text, "the error")
    assert "no conversation" in error and len(turns(browser)) == 3
    assert wait_until(lambda: state_ids(url) == states_before)  # its handle is deleted again


def test_api_key_is_asked_for(browser, engine):
    """A server with --api-key: the page asks for the key once, then works."""
    app = create_app(engine, engine.tokenizer, ServerConfig(model_name="demo", api_key=API_KEY))
    with ServerThread(app) as u:
        browser.get(u)
        wait(browser, lambda d: d.find_element(By.ID, "key-dialog").is_displayed(), "dialog")
        browser.find_element(By.ID, "key-input").send_keys(API_KEY, Keys.ENTER)
        wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "demo", "model")
        fill_settings(browser, max_tokens=8)  # another origin: the settings start empty
        send(browser, "x = 1")
        assert wait_answered(browser, 1)[0]["answer"]
        browser.refresh()  # the key lasts as long as the tab
        wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "demo", "reload")
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        js(browser, "sessionStorage.clear()")


def test_keyboard_and_labels(browser, url):
    """Every control has a name; keyboard focus is visible; answers go to a live region."""
    open_page(browser, url)
    unnamed = js(
        browser,
        """const name = (el) => el.getAttribute('aria-label') || el.labels?.[0]?.textContent
              || (el.getAttribute('aria-labelledby') && document.getElementById(
                    el.getAttribute('aria-labelledby')).textContent) || el.textContent;
        return [...document.querySelectorAll('button, input, textarea, select')]
            .filter(el => !el.closest('template') && !(name(el) || '').trim())
            .map(el => el.outerHTML);""",
    )
    assert unnamed == []
    announcer = browser.find_element(By.ID, "announcer")
    assert announcer.get_attribute("aria-live") == "polite"
    # Tab through the page (it starts in the message box): each control focused by the
    # keyboard shows an outline (the hidden file input of "Load": its label does).
    seen = []
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(
            js(
                browser,
                """let el = document.activeElement;
                if (el === document.body) return null;
                const id = el.id;
                if (el.classList.contains('visually-hidden')) el = el.parentElement;
                const s = getComputedStyle(el);
                return [id, s.outlineStyle, parseFloat(s.outlineWidth)];""",
            )
        )
    seen = [s for s in seen if s]
    assert {"send", "new-chat", "load-file", "settings-toggle"} <= {s[0] for s in seen}
    assert all(style != "none" and width >= 2 for _, style, width in seen), seen


def test_narrow_window(browser, url):
    """At 400 px nothing is wider than the window: the top bar wraps, long lines break,
    the settings panel and the message box fit."""
    browser.set_window_size(400, 800)
    try:
        width = js(browser, "return window.innerWidth")
        open_page(browser, url, max_tokens=8)
        send(browser, "x" * 300)  # one unbreakable word
        wait_answered(browser, 1)
        browser.find_element(By.ID, "settings-toggle").click()

        def fits(element_id: str) -> bool:
            box = browser.find_element(By.ID, element_id).rect
            return box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5

        for element_id in ("message", "send", "stop", "settings", "new-chat", "load-label"):
            assert fits(element_id), element_id
        assert js(browser, "return document.documentElement.scrollWidth") <= width
        assert (
            js(browser, "return getComputedStyle(document.querySelector('.layout')).flexDirection")
            == "column"
        )  # the narrow layout is on
    finally:
        browser.set_window_size(1200, 900)
