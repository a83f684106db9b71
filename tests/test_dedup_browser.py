"""report.html in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by scripts/setup_apt.sh) renders every group, the score
filter hides pairs as it moves, the keys walk the groups, and nothing asks the network.

Set DEDUP_SCREENSHOT=docs/dedup_report.png to refresh the README's screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mtl.dedup import find_duplicates

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and none of Chromium's background traffic: this machine has no network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1100,820")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: `make setup`")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("Chromium is not installed: `make setup` installs Debian's chromium and chromium-driver "
                    "(scripts/setup_apt.sh)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture()
def report(folder_with_copies, imagenet_branches_checkpoint, tmp_path):
    """(report.html, result): the planted copies found with a checkpoint; near misses
    down to 0.55 are listed too, so the filter has something to hide."""
    folder, _ = folder_with_copies
    result = find_duplicates(folder, method=str(imagenet_branches_checkpoint), threshold=0.8,
                             min_score_report=0.55, cache_dir=tmp_path / "cache")
    return result.write(tmp_path / "out")["report"], result


def visible_pairs(browser) -> int:
    return sum(pair.is_displayed() for pair in browser.find_elements("css selector", ".pair"))


def test_report_renders_groups_filters_live_and_navigates_by_keys(browser, report, tmp_path):
    path, result = report
    browser.get(path.as_uri())
    assert len(browser.find_elements("css selector", "section.group")) == len(result.groups) == 3
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    everything = visible_pairs(browser)
    assert everything == len(result.pairs) > 3  # kept pairs and near misses
    assert browser.find_element("id", "shown").text == f"3 groups, {everything} pairs shown"

    number = browser.find_element("id", "filter-value")  # typed, key by key, as a person would
    number.clear()
    number.send_keys("0.9")
    above = int((result.pairs["score"] >= 0.9).sum())
    assert visible_pairs(browser) == above < everything
    assert browser.find_element("id", "shown").text == f"{above} groups, {above} pairs shown"
    assert browser.execute_script("return document.getElementById('filter').value") == "0.9"

    browser.execute_script(  # the slider, dragged back to its lowest score
        "const s = document.getElementById('filter'); s.value = s.min; s.dispatchEvent(new Event('input'))")
    assert visible_pairs(browser) == everything

    body = browser.find_element("tag name", "body")
    number.send_keys("\ue00c")  # Escape leaves the input, so letters become commands
    current = "return document.querySelector('section.current h2').textContent"
    body.send_keys("j")
    assert browser.execute_script(current).startswith("Group 1 ")
    body.send_keys("jj")
    assert browser.execute_script(current).startswith("Group 3 ")
    body.send_keys("k")
    assert browser.execute_script(current).startswith("Group 2 ")
    body.send_keys("+")
    assert visible_pairs(browser) < everything

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors  # a blocked request (the page's CSP forbids any) would be reported here


def test_screenshot_of_the_report(browser, report, tmp_path):
    path, _ = report
    browser.get(path.as_uri())
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DEDUP_SCREENSHOT"):  # 256 colours: a third of the bytes, for the README
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(256).save(os.environ["DEDUP_SCREENSHOT"], optimize=True)
