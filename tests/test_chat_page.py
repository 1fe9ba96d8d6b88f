"""`make chat`'s page in a real browser: ask, get the fine-tuned answer, ask a follow-up that needs the history.

Headless Chromium from Debian (`apt-get install chromium chromium-driver`), driven by Selenium through
Debian's chromedriver; nothing is downloaded. Without the browser the test is skipped, except in CI (where
the variable CI is set), where it fails. The screenshot lands in <WORK_DIR>/screenshots/chat_page.png.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import PROJECT_DIR, WORK_DIR, free_port, require_browser, stop_tree

ANSWER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def chat_server(demo_run):
    """`pf flow serve ... --engine fastapi` (what `make chat` runs) on a free port, in front of the local endpoint."""
    require_browser()
    port = free_port()
    log_path = WORK_DIR / "pf-flow-serve.log"
    pf = Path(sys.executable).parent / "pf"
    command = [str(pf), "flow", "serve", "--source", str(PROJECT_DIR), "--port", str(port), "--host", "localhost",
               "--engine", "fastapi", "--skip-open-browser"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://localhost:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"pf flow serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"pf flow serve did not start:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(url + "health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        stop_tree(process.pid)


def send(driver, text):
    """Type a message into the page's input_data box and press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    label = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.XPATH, "//label[starts-with(normalize-space(.), 'input_data')]"))
    box = driver.find_element(By.ID, label.get_attribute("for"))
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_for_text(driver, text):
    """The page's visible text, once it contains `text`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def page_text(d):
        return d.find_element(By.TAG_NAME, "body").text

    WebDriverWait(driver, ANSWER_TIMEOUT_S).until(lambda d: text in page_text(d),
                                                  message=f"{text!r} never appeared on the chat page")
    return page_text(driver)


def test_chat_page_answers_and_keeps_the_history(chat_server, browser):
    browser.get(chat_server)
    send(browser, "Who founded Microsoft?")
    wait_for_text(browser, "Bill Gates")
    send(browser, "Where is its headquarters today?")
    # "its" only means Microsoft if the first exchange reached the endpoint with the follow-up.
    page = wait_for_text(browser, "Redmond")
    screenshots = WORK_DIR / "screenshots"
    screenshots.mkdir(exist_ok=True)
    browser.save_screenshot(str(screenshots / "chat_page.png"))
    print(f"screenshot: {screenshots / 'chat_page.png'}")
    for shown in ("Who founded Microsoft?", "Microsoft was founded by Bill Gates", "Where is its headquarters today?",
                  "Microsoft's headquarters is in Redmond"):
        assert shown in page
    assert page.index("Bill Gates") < page.index("Where is its headquarters today?") < page.index("Redmond")
