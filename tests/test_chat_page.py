"""`make chat`'s page in a real browser: ask, get the fine-tuned answer, ask a follow-up that needs the history.

Headless Chromium from Debian (`apt-get install chromium chromium-driver`), driven by Selenium through
Debian's chromedriver; nothing is downloaded. Without the browser the test is skipped, except in CI (where
the variable CI is set), where it fails. The screenshot lands in <WORK_DIR>/screenshots/chat_page.png.
"""

import sys
from pathlib import Path

import pytest

from conftest import PROJECT_DIR, WORK_DIR, free_port, require_browser, server_process

pytestmark = pytest.mark.slow  # the demo's endpoint, `pf flow serve` and a browser

ANSWER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def chat_server(demo_run):
    """`pf flow serve ... --engine fastapi` (what `make chat` runs) on a free port, in front of the local endpoint."""
    require_browser()
    port = free_port()
    pf = Path(sys.executable).parent / "pf"
    command = [pf, "flow", "serve", "--source", PROJECT_DIR, "--port", port, "--host", "localhost", "--engine", "fastapi",
               "--skip-open-browser"]
    with server_process(command, f"http://localhost:{port}/health", "pf-flow-serve.log", timeout_s=60):
        yield f"http://localhost:{port}/"


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
