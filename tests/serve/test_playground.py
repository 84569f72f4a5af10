"""The playground page at ``/`` in a real browser: headless Chromium (Selenium) against a live server of
the tiny preset with the tiny image scorer and an API key. It generates best-of-N over the event
stream and shows the ranked images, shows one-line errors, and cancels a long generation.

``FASTGEN_SCREENSHOT=PATH`` saves a 1280x900 screenshot of the ranked images there (docs/img/playground.png).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import TIMEOUT, runtime_counts, wait_for

from fastgen.serve import ServeConfig, Service, create_app

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "playground-test-key"
PROMPT = "a red vintage bicycle leaning against a sunlit brick wall, 35mm photo"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                              else None)
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(live_server, tiny_models):
    config = ServeConfig(model="tiny", scorers=("tiny",), api_key=KEY, max_images=4)
    service = Service(config, generator=tiny_models["generator"], scorers=[tiny_models["image"]])
    return live_server(create_app(config, service=service)).wait_ready(headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def driver():
    found = find_browser()
    if found is None:
        pytest.skip("no Chromium/chromedriver installed: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=DriverService(found[1]), options=options)
    browser.set_window_size(1280, 900)
    yield browser
    browser.quit()


def wait(driver, condition, what: str):
    """Wait for ``condition(driver)`` (a hang fails after TIMEOUT, saying what the page says; no timing
    is asserted)."""
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(condition)
    except TimeoutException:
        said = {name: driver.find_element(By.ID, name).text for name in ("status", "error", "models")}
        raise AssertionError(f"timed out waiting for {what}; the page says {said}") from None


def js_errors(driver) -> list[dict]:
    """Severe browser-log entries other than HTTP error statuses (the error tests provoke those)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]


def open_page(driver, server, key: str = KEY) -> None:
    driver.get(server.url + "/")
    wait(driver, lambda d: d.find_element(By.ID, "models").text != "Connecting…", "the models line")
    fill(driver, "api-key", key)
    driver.find_element(By.ID, "prompt").click()  # leave the key field: its change reloads the models


def fill(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    if value != "":
        field.send_keys(str(value))


def error_line(driver) -> str:
    return wait(driver, lambda d: d.find_element(By.ID, "error").text, "the error line")


def test_generate_shows_the_ranked_candidates(driver, server):
    open_page(driver, server)
    wait(driver, lambda d: "image scorer tiny:classifier" in d.find_element(By.ID, "models").text, "the models")
    fill(driver, "prompt", PROMPT)
    fill(driver, "candidates", 3)
    fill(driver, "keep", 3)
    fill(driver, "steps", 4)
    fill(driver, "seed", 7)
    fill(driver, "size", "48x48")
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith("Done"), "the ranked images")

    cards = driver.find_elements(By.CSS_SELECTOR, "#results li.card")
    assert len(cards) == 3
    ranks, scores, seeds = [], [], []
    for card in cards:
        img = card.find_element(By.TAG_NAME, "img")
        src = img.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (48, 48)
        assert img.is_displayed() and PROMPT in img.get_attribute("alt")
        ranks.append(int(card.get_attribute("data-rank")))
        score = re.fullmatch(r"clean (\d\.\d{4})", card.find_element(By.CLASS_NAME, "score").text)
        assert score, card.text
        scores.append(float(score.group(1)))
        seed = card.find_element(By.CLASS_NAME, "seed")
        assert seed.text == f"seed {seed.get_attribute('data-seed')}"
        seeds.append(int(seed.get_attribute("data-seed")))
        bar = card.find_element(By.TAG_NAME, "progress")
        # Every step was shown (the default scheduler may run a step more than asked: PNDM's warm-up).
        assert int(bar.get_attribute("max")) >= 4 and bar.get_attribute("value") == bar.get_attribute("max")
    assert ranks == [0, 1, 2]
    assert scores == sorted(scores, reverse=True)
    assert sorted(seeds) == [7, 8, 9]
    latency = driver.find_element(By.ID, "latency").text
    assert "total" in latency and "queue" in latency and "per step" in latency
    assert driver.find_element(By.ID, "error").text == ""

    if os.environ.get("FASTGEN_SCREENSHOT"):
        shot = Path(os.environ["FASTGEN_SCREENSHOT"])
        shot.parent.mkdir(parents=True, exist_ok=True)
        # The viewport, not the window, at 1280x900 (a headless window's frame would take some of it).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        try:
            assert driver.save_screenshot(str(shot))
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # Copying a seed says so (or that the clipboard refused), without a script error.
    cards[1].find_element(By.CLASS_NAME, "seed").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith(f"Seed {seeds[1]}"), "the copy status")
    # Replay: the best image's seed goes into the form, for one candidate.
    cards[0].find_element(By.CLASS_NAME, "replay").click()
    assert driver.find_element(By.ID, "seed").get_attribute("value") == str(seeds[0])
    assert driver.find_element(By.ID, "candidates").get_attribute("value") == "1"
    assert not js_errors(driver)


def test_errors_are_one_line_on_the_page(driver, server):
    open_page(driver, server, key="")
    wait(driver, lambda d: "API key" in d.find_element(By.ID, "models").text, "the key hint")
    fill(driver, "prompt", PROMPT)
    driver.find_element(By.ID, "generate").click()
    message = error_line(driver)
    assert message.startswith("Error: 401: missing or wrong API key") and "\n" not in message

    fill(driver, "api-key", KEY)
    fill(driver, "size", "0x0")
    fill(driver, "steps", 2)
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: "size" in d.find_element(By.ID, "error").text, "the size error")
    message = driver.find_element(By.ID, "error").text
    assert message.startswith("Error: 400: ") and "0x0" in message and "\n" not in message
    assert driver.find_elements(By.CSS_SELECTOR, "#results li.card") == []
    assert not js_errors(driver)


def test_cancel_stops_the_generation_and_the_page_stays_usable(driver, server):
    service = server.service
    before = runtime_counts(service)
    open_page(driver, server)
    fill(driver, "prompt", PROMPT)
    fill(driver, "candidates", 1)
    fill(driver, "keep", 1)
    fill(driver, "steps", 500)  # far longer than the test waits (as in test_app_cancel)
    fill(driver, "size", "48x48")
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: int(d.find_element(By.CSS_SELECTOR, "#results progress").get_attribute("value")) >= 1,
         "the first progress event")
    driver.find_element(By.ID, "cancel").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text == "Cancelled.", "the cancelled status")
    assert driver.find_element(By.ID, "generate").is_enabled()
    assert not driver.find_element(By.ID, "cancel").is_enabled()
    assert driver.find_element(By.ID, "error").text == ""
    # The aborted fetch closed the stream: the server cancelled the runtime request.
    after = wait_for(lambda: (c := runtime_counts(service)).get("cancelled", 0) > before.get("cancelled", 0) and c,
                     "the request to end cancelled")
    assert after.get("succeeded", 0) == before.get("succeeded", 0)

    fill(driver, "steps", 2)
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith("Done"), "the next generation")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results li.card img")) == 1
    assert not js_errors(driver)
