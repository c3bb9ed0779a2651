"""The report opened in a real browser: Debian's headless Chromium, driven by Selenium through the system
chromedriver (``Service("/usr/bin/chromedriver")`` with the browser binary given, so Selenium Manager never
runs and nothing is downloaded). Chromium's own logs are the witnesses: the console log ("browser") for
errors and the DevTools performance log ("performance", Network.* events) for every request the page made.

Why Selenium rather than the DevTools protocol by hand: CDP needs a WebSocket client (not in the standard
library) or a hand-written pipe transport; Debian ships chromedriver built from the same source as its
Chromium, so the pair always matches, and Selenium's WebDriver calls and log capabilities are stable, documented
API that still gives the CDP Network events through the performance log.

A store holding a row of every kind the report draws is rendered; the page must load without console
errors or failed requests, make no request but for itself (data: URLs are inline), show every <img>
decoded (complete, naturalWidth > 0) and carry every section heading. A second, deliberately broken page
proves the witnesses see a network request and a console error.

Skipped only where Chromium is missing and CI is not set; under CI a missing browser fails the test.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_report_transfer import SECTIONS, rows_of_every_kind  # the same store, checked there without a browser

from selfsup.results.report import build_report
from selfsup.results.store import Store

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser_report")
    store = Store(tmp / "r.sqlite")
    store.put(rows_of_every_kind())
    return build_report(store, tmp / "report.html")


@dataclass
class PageLoad:
    images: list           # [complete, naturalWidth, alt] of every <img>
    headings: list[str]
    console_errors: list[str]
    requests: list[str]    # URLs of every request but data: ones
    failed: list[str]


def _chromium_or_skip():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    message = f"the browser test needs {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set but {message}: .ci/run installs them", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _load(driver, page: Path) -> PageLoad:
    from selenium.webdriver.support.ui import WebDriverWait

    for log in ("browser", "performance"):  # drop what an earlier page left
        driver.get_log(log)
    driver.get(page.as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    images = driver.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt])")
    headings = driver.execute_script(
        "return Array.from(document.querySelectorAll('h1,h2,h3,h4'), h => h.textContent.trim())")
    console = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    failed = [f"{e['params'].get('errorText')} ({e['params'].get('requestId')})" for e in events
              if e["method"] == "Network.loadingFailed"]
    failed += [f"HTTP {e['params']['response']['status']} {e['params']['response']['url']}" for e in events
               if e["method"] == "Network.responseReceived" and e["params"]["response"].get("status", 0) >= 400]
    return PageLoad(images, headings, console, [u for u in requests if not u.startswith("data:")], failed)


def test_report_in_headless_chromium(browser, report):
    load = _load(browser, report)
    assert load.console_errors == []
    assert load.failed == []
    assert load.requests == [report.as_uri()]                 # the page itself, nothing else: self-contained
    page = report.read_text(encoding="utf-8")
    assert len(load.images) == page.count("<img ") >= 10
    broken = [img for img in load.images if not (img[0] and img[1] > 0)]
    assert broken == []
    for section in SECTIONS:
        assert any(h.startswith(section) for h in load.headings), section


def test_the_witnesses_see_a_request_and_a_console_error(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><body><h1>bad</h1><img alt='x' src='http://127.0.0.1:9/x.png'>"
                   "<script>console.error('boom')</script></body></html>")
    load = _load(browser, bad)
    assert "http://127.0.0.1:9/x.png" in load.requests and load.failed
    assert any("boom" in m for m in load.console_errors)
    assert load.images == [[True, 0, "x"]]                   # a broken image: complete, but nothing decoded
