"""The dashboard in headless Chromium (Selenium + /usr/bin/chromedriver).

``scripts/install_browser.sh`` installs both from Debian; skipped when either is missing.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import NEEDS_BROWSER
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    NGINX,
    TOKEN,
    Samples,
    behind_nginx,
    bench,
    detector,
    private_cluster,
    samples,
    service_model,
    serving,
    tinted,
)

pytestmark = [pytest.mark.browser, NEEDS_BROWSER]


def open_dashboard(browser: Any, url: str) -> None:
    """The dashboard of the service at ``url``, connected with the API token."""
    from selenium.webdriver.common.by import By

    browser.get(url + "/dashboard")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "connect").click()


def parts_shown(browser: Any) -> list[str]:
    """The part ids of the live decisions' rows, read at once in the page: no row replaced midway
    (the page may be read anew under a wait)."""
    return list(browser.execute_script("return [...document.querySelectorAll('#decisions tbody tr')]"
                                       ".map((r) => r.cells[2].textContent);"))


def send_part(url: str, samples: Samples, part: str) -> None:
    """A PASS part with id ``part`` sent to the service at ``url``."""
    body, ftype = samples.one("PASS")
    params = {"feature_type": ftype, "part_id": part}
    r = httpx.post(url + "/v1/inspect", content=body, headers=AUTH, params=params)
    assert r.status_code == 200, r.text


def own_service(detector: Any, store: Path) -> Any:
    """A service of ``detector`` on a store of its own (``store``), with the test's token."""
    from diffqc.service.app import ServiceSettings, create_app

    return create_app(ServiceSettings(db_url=str(store), tokens=(TOKEN,)), detector=detector)


def status_says(text: str) -> Any:
    """A wait's condition: the status line says ``text``, read in one call to the page, so that a
    reload under the wait (the service restarted) finds no element of the page before it."""
    from selenium.common.exceptions import WebDriverException

    def says(browser: Any) -> bool:
        try:
            return text in str(browser.execute_script("return document.getElementById('status').textContent"))
        except WebDriverException:  # between two loads of the page
            return False

    return says


PHONE = (390, 844)  # CSS pixels of a phone's screen, upright


def on_a_phone(browser: Any) -> None:
    """The browser as a phone's: its screen (:data:`PHONE`), a mobile viewport."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 3, "mobile": True})


def drawn_width(browser: Any, img: Any) -> float:
    """How wide an image is drawn in its frame (``object-fit: contain``): the frame's width, or
    less where its height bounds the picture."""
    return float(browser.execute_script(
        "const i = arguments[0], r = i.getBoundingClientRect();"
        "return Math.min(r.width, r.height * i.naturalWidth / i.naturalHeight);", img))


@pytest.fixture
def live_server(detector: Any, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The app under a real uvicorn on 127.0.0.1 (in a thread, the loaded model injected)."""
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,)), detector=detector)
    with serving(app) as url:
        yield url, app.state.diffqc


def test_dashboard_shows_decisions_and_records_a_review(
    live_server: tuple[str, Any], browser: Any, samples: Samples
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    wait = WebDriverWait(browser, 20)
    browser.get(url + "/dashboard")
    # a wrong token is refused and said so
    browser.find_element(By.ID, "token").send_keys("wrong-token")
    browser.find_element(By.ID, "connect").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "token refused"))
    # and a part looked for meanwhile keeps that said (it was overwritten by "unauthorized")
    browser.find_element(By.ID, "find").send_keys("#1\n")
    time.sleep(0.5)
    assert "token refused" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "connect").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))

    body, ftype = samples.one("REVIEW")
    r = httpx.post(
        url + "/v1/inspect",
        content=body,
        headers=AUTH,
        params={"feature_type": ftype, "part_id": "browser-1"},
    )
    assert r.status_code == 200
    rid = r.json()["id"]
    passed, ptype = samples.one("PASS")
    httpx.post(url + "/v1/inspect", content=passed, headers=AUTH, params={"feature_type": ptype})

    # the decision appears in the live table
    row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]'))
    )
    assert "REVIEW" in row.text and "browser-1" in row.text
    # rates per type and a score histogram are drawn
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#rates tr[data-type="{ftype}"]')))
    # the share flagged beside the levels the calibration decides at (the REVIEW part: 100 %)
    share = "100 %" if ftype != ptype else "50 %"
    wait.until(ec.text_to_be_present_in_element(
        (By.CSS_SELECTOR, f'#rates tr[data-type="{ftype}"] td.flagged'), share))
    levels = state.model_info["thresholds"]
    target = browser.find_element(By.ID, "rates-target").text
    assert f"the calibration flags {levels['alpha_review'] * 100:g} % of GOOD parts" in target
    assert f"rejects {levels['alpha_reject'] * 100:g} %" in target
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#hists svg[data-type="{ftype}"]')))

    # the review card shows the image and its heat-map overlay (fetched with the token)
    card = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]'))
    )
    wait.until(
        lambda d: all(
            (img.get_attribute("src") or "").startswith("blob:")
            and d.execute_script("return arguments[0].naturalWidth", img) > 0
            for img in card.find_elements(By.TAG_NAME, "img")
        )
    )
    card.find_element(By.CSS_SELECTOR, ".verdict-good").click()
    wait.until(ec.staleness_of(card))
    wait.until(
        ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"] .review-cell'), "GOOD"
        )
    )
    rec = state.store.get(rid)
    assert rec.review == "GOOD" and rec.reviewer == "dashboard" and rec.decision == "REVIEW"
    # a BAD verdict from the queue names the defect's kind in the card's own field
    second, stype = samples.by_decision["REVIEW"][1]
    sid = httpx.post(url + "/v1/inspect", content=second, headers=AUTH,
                     params={"feature_type": stype}).json()["id"]
    card = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{sid}"]')))
    card.find_element(By.CSS_SELECTOR, "input.defect").send_keys("blowhole")
    card.find_element(By.CSS_SELECTOR, ".verdict-bad").click()
    wait.until(ec.staleness_of(card))
    assert (state.store.get(sid).review, state.store.get(sid).review_defect) == ("BAD", "blowhole")
    wait.until(lambda d: [o.get_attribute("value") for o in d.find_elements(
        By.CSS_SELECTOR, "#defect-kinds option")] == ["blowhole"])  # offered from now on
    logs = [
        e
        for e in browser.get_log("browser")
        if e.get("level") == "SEVERE" and "401" not in e.get("message", "")
    ]
    assert logs == []


def test_dashboard_drift_panel_shows_a_types_alarm(
    live_server: tuple[str, Any], browser: Any, samples: Samples
) -> None:
    """The drift panel lists every type the monitor has seen and turns to DRIFT when the
    service's own drift monitor raises an alarm (p-values far below uniform)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    wait = WebDriverWait(browser, 30)
    body, ftype = samples.one("PASS")
    r = httpx.post(url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
    assert r.status_code == 200
    open_dashboard(browser, url)
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#drift tr[data-type="{ftype}"]')))
    assert row.get_attribute("data-alarm") == "0" and "OK" in row.text
    # the line drifts: the monitor receives parts whose p-values are all small
    monitor = state.line.drift
    for _ in range(monitor.config.min_parts + 10):
        monitor.observe(ftype, 0.002, decision="REJECT")
    assert monitor.snapshot()[ftype]["alarm"]
    wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#drift tr[data-type="{ftype}"][data-alarm="1"]')))
    text = browser.find_element(By.CSS_SELECTOR, f'#drift tr[data-type="{ftype}"]').text
    assert "DRIFT" in text
    # the type is seen by two cameras, one of them drifting: a row per camera, the one named
    n = monitor.config.min_parts + 10
    for i in range(n):
        monitor.observe(ftype, (i + 0.5) / n, camera="cam-a")  # as uniform as n p-values get
        monitor.observe(ftype, 0.002, camera="cam-b")
    cam = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#drift tr[data-type="{ftype}"][data-camera="cam-b"][data-alarm="1"]')))
    assert "camera cam-b" in cam.text and "DRIFT" in cam.text
    calm = browser.find_element(By.CSS_SELECTOR, f'#drift tr[data-type="{ftype}"][data-camera="cam-a"]')
    assert calm.get_attribute("data-alarm") == "0" and "OK" in calm.text
    # a camera switched to colour (the model learned grey parts): the panel of parts unlike
    # their training images, hidden until then, names the type, the check and the parts
    assert not browser.find_element(By.ID, "unlike").is_displayed()
    colour = tinted(body)
    for _ in range(3):
        r = httpx.post(url + "/v1/inspect", content=colour, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 200
    row = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, f'#unlike tr[data-type="{ftype}"][data-check="colour"]')))
    wait.until(lambda _: row.find_elements(By.TAG_NAME, "td")[2].text == "3")
    assert "a colour image of type" in row.text


def test_dashboard_corrects_a_verdict_and_shows_its_history(
    live_server: tuple[str, Any], browser: Any, samples: Samples
) -> None:
    """A mis-click in the review queue is corrected from the part's panel: the verdict changes,
    the reviewer's name and note are stored with it and both verdicts are listed; a PASSed part
    can be given a verdict too (a defect the line missed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    wait = WebDriverWait(browser, 20)
    flagged, ftype = samples.one("REVIEW")
    rid = httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                     params={"feature_type": ftype, "part_id": "p-1"}).json()["id"]
    passed, ptype = samples.one("PASS")
    pid = httpx.post(url + "/v1/inspect", content=passed, headers=AUTH,
                     params={"feature_type": ptype, "part_id": "p-2"}).json()["id"]
    # an operator at UTC+3 reads the times on their own clock (the API gives UTC)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Etc/GMT-3"})
    browser.get(url + "/dashboard")
    browser.find_element(By.ID, "reviewer").send_keys("ann")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "connect").click()

    card = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]'))
    )
    iso = state.store.get(rid).to_json()["created"]  # as the API gives it: UTC, milliseconds
    created = dt.datetime.fromisoformat(iso.replace("Z", "+00:00")) + dt.timedelta(hours=3)
    row = browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')
    assert row.find_elements(By.TAG_NAME, "td")[1].text == created.strftime("%H:%M:%S.%f")[:-3]
    assert "Etc/GMT-3" in browser.find_element(By.CSS_SELECTOR, "#decisions thead").text
    card.find_element(By.CSS_SELECTOR, ".verdict-good").click()  # the wrong button
    wait.until(ec.staleness_of(card))
    assert (state.store.get(rid).review, state.store.get(rid).reviewer) == ("GOOD", "ann")

    browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]').click()
    panel = wait.until(ec.visibility_of_element_located((By.ID, "part")))
    wait.until(lambda d: panel.get_attribute("data-id") == str(rid) and "p-1" in panel.text)
    assert "GOOD by ann" in panel.text
    browser.find_element(By.ID, "part-note").send_keys("under the fixture's mark")
    browser.find_element(By.ID, "part-defect").send_keys("crack")  # its kind, for the export
    panel.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="BAD"]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#part-history tbody tr")) == 2)
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#part-history tbody tr")]
    assert rows[0].split()[2:] == ["GOOD", "ann"] and rows[1].split()[2:5] == ["BAD", "crack", "ann"]
    assert "under the fixture's mark" in rows[1] and "BAD (crack) by ann" in panel.text
    rec = state.store.get(rid)
    assert (rec.review, rec.review_defect, rec.reviewer, rec.review_note) == (
        "BAD", "crack", "ann", "under the fixture's mark")
    assert browser.find_element(By.ID, "part-defect").get_attribute("value") == ""
    wait.until(ec.text_to_be_present_in_element(
        (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"] .review-cell'), "BAD"))

    # a part the line PASSed, seen to be defective, is given a verdict the same way
    browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{pid}"]').click()
    wait.until(lambda d: panel.get_attribute("data-id") == str(pid) and "p-2" in panel.text)
    assert browser.find_element(By.ID, "part-note").get_attribute("value") == ""
    # the kinds given before are offered as the reviewer types (one kind, one spelling)
    wait.until(lambda d: [o.get_attribute("value") for o in d.find_elements(
        By.CSS_SELECTOR, "#defect-kinds option")] == ["crack"])
    assert browser.find_element(By.ID, "part-defect").get_attribute("list") == "defect-kinds"
    # a kind typed and then GOOD clicked (a GOOD part has no kind) is said not to be kept
    browser.find_element(By.ID, "part-defect").send_keys("scratch")
    panel.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="GOOD"]').click()
    wait.until(ec.text_to_be_present_in_element(
        (By.ID, "status"), "defect kind \u201cscratch\u201d not kept"))
    assert (state.store.get(pid).review, state.store.get(pid).review_defect) == ("GOOD", None)
    panel.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="BAD"]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#part-history tbody tr")) == 2)
    assert (state.store.get(pid).decision, state.store.get(pid).review) == ("PASS", "BAD")

    # a part found by its part id (the table holds only the latest), and a record that is not there
    browser.find_element(By.ID, "find").send_keys("p-1\n")
    wait.until(lambda d: panel.get_attribute("data-id") == str(rid))
    browser.find_element(By.ID, "find").clear()
    browser.find_element(By.ID, "find").send_keys("#424242\n")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "no record #424242"))
    browser.find_element(By.ID, "find").clear()
    browser.find_element(By.ID, "find").send_keys("no-such-part\n")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "no part no-such-part stored"))

    browser.refresh()  # the reviewer's name is remembered in this browser
    assert wait.until(lambda d: d.find_element(By.ID, "reviewer").get_attribute("value")) == "ann"


def test_a_verdict_given_on_a_stale_screen_does_not_replace_another_reviewers(
    live_server: tuple[str, Any], browser: Any, samples: Samples
) -> None:
    """Two reviewers on one part: ann's panel showed it without a verdict, bob gave GOOD from his
    screen, and ann's BAD then replaced his without her seeing it (only the history kept it).
    Her verdict is refused and said, the panel shows his; given again, it replaces his."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    wait = WebDriverWait(browser, 20)
    flagged, ftype = samples.one("REVIEW")
    rid = httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                     params={"feature_type": ftype, "part_id": "p-1"}).json()["id"]
    browser.get(url + "/dashboard")
    browser.find_element(By.ID, "reviewer").send_keys("ann")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "connect").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]'))).click()
    panel = wait.until(ec.visibility_of_element_located((By.ID, "part")))
    wait.until(lambda d: panel.get_attribute("data-id") == str(rid) and "p-1" in panel.text)
    assert "verdict\nnone" in panel.text or "verdict none" in panel.text
    r = httpx.post(f"{url}/v1/review/{rid}", headers=AUTH, json={"verdict": "GOOD", "reviewer": "bob"})
    assert r.status_code == 200  # bob, at another screen
    browser.find_element(By.ID, "part-note").send_keys("a scratch")
    panel.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="BAD"]').click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "your verdict was not given"))
    status = browser.find_element(By.ID, "status").text
    assert status.startswith(f"result {rid} was reviewed meanwhile: GOOD by bob at "), status
    wait.until(lambda d: "GOOD by bob" in panel.text)
    assert (state.store.get(rid).review, state.store.get(rid).reviewer) == ("GOOD", "bob")
    assert browser.find_element(By.ID, "part-note").get_attribute("value") == "a scratch"  # kept to send
    panel.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="BAD"]').click()  # seen: given
    wait.until(lambda d: "BAD by ann" in panel.text)
    rec = state.store.get(rid)
    assert (rec.review, rec.reviewer, rec.review_note) == ("BAD", "ann", "a scratch")
    assert [h["reviewer"] for h in state.store.review_history(rid)] == ["bob", "ann"]


def test_dashboard_shows_the_other_crops_of_a_part(
    live_server: tuple[str, Any], browser: Any, samples: Samples
) -> None:
    """A reviewer judging a flagged crop saw it alone: the part's other crops, and the part's
    verdict, were not on the page. The part panel lists them (one per type, with its decision)
    and shows any of them on a click."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = live_server
    # the page redraws the part's crops as it polls: an element found may be gone when read
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    flagged, ftype = samples.one("REVIEW")
    passed, ptype = next((b, t) for b, t in samples.by_decision["PASS"] if t != ftype)
    r = httpx.post(url + "/v1/inspect/batch", headers=AUTH,
                   data={"feature_type": [ptype, ftype], "part_id": "A/7"},
                   files=[("image", (f"{i}.png", b, "image/png")) for i, b in enumerate((passed, flagged))])
    assert r.status_code == 200, r.text
    pass_id, review_id = (x["id"] for x in r.json()["results"])
    missing = r.json()["parts"][0]["missing"]  # the model's other types
    assert missing
    open_dashboard(browser, url)
    row = f'#decisions tbody tr[data-id="{review_id}"]'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, row)))
    browser.find_element(By.CSS_SELECTOR, row).click()
    crops = wait.until(ec.visibility_of_element_located((By.ID, "part-crops")))
    assert f"part A/7: REVIEW 2 images, 1 to review, no image yet of {', '.join(missing)}" in crops.text
    buttons = crops.find_elements(By.TAG_NAME, "button")
    assert [b.text for b in buttons] == [f"{ptype} PASS", f"{ftype} REVIEW"]
    assert "chosen" in buttons[1].get_attribute("class")
    buttons[0].click()  # the part's other crop
    panel = browser.find_element(By.ID, "part")
    wait.until(lambda d: panel.get_attribute("data-id") == str(pass_id))
    chosen = f'#part-crops button[data-id="{pass_id}"]'
    wait.until(lambda d: "chosen" in d.find_element(By.CSS_SELECTOR, chosen).get_attribute("class"))
    # a record without a part id shows no crops
    single = httpx.post(url + "/v1/inspect", content=passed, headers=AUTH,
                        params={"feature_type": ptype}).json()
    row = f'#decisions tbody tr[data-id="{single["id"]}"]'
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, row)))
    browser.find_element(By.CSS_SELECTOR, row).click()
    wait.until(lambda d: panel.get_attribute("data-id") == str(single["id"]))
    wait.until(ec.invisibility_of_element_located((By.ID, "part-crops")))
    # the latest parts, one row each: its verdict, how many of the model's types came, the others
    wait.until(ec.visibility_of_element_located((By.ID, "parts")))
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#parts tbody tr[data-part="A/7"]')))
    time.sleep(3)  # a poll later (2.5 s), nothing changed: the same row, not one rebuilt under the click
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:4] == ["A/7", "REVIEW", f"2 of {2 + len(missing)}", " ".join(missing)], cells
    row.click()  # shows its latest crop
    wait.until(lambda d: panel.get_attribute("data-id") == str(review_id))


def test_dashboard_connects_by_itself_where_no_token_is_needed(
    live_server: tuple[str, Any], browser: Any, detector: Any, tmp_path: Path
) -> None:
    """Opened on a service that needs a token, the dashboard asks for it; on one run with
    --no-auth it connected only once some token was typed: now it connects by itself."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    url, _ = live_server
    wait = WebDriverWait(browser, 20)
    browser.get(url + "/dashboard")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "enter the API token"))
    settings = ServiceSettings(db_url=str(tmp_path / "open.db"), allow_no_token=True)
    app = create_app(settings, detector=detector)
    with serving(app) as open_url:
        browser.get(open_url + "/dashboard")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
        wait.until(lambda d: d.find_element(By.ID, "model-version").text not in ("", "–"))


def test_a_kiosk_screen_connects_with_the_token_in_its_start_address(
    live_server: tuple[str, Any], browser: Any
) -> None:
    """A line-side screen in kiosk mode (`chromium --kiosk URL`, no keyboard) asked for the API
    token at each power-on, as the dashboard keeps it for its tab only. Its start address may
    carry it as ``/dashboard#token=...`` (a fragment: never sent to the service, nor to a proxy's
    log): the dashboard connects with it and takes it off the address bar."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = live_server
    wait = WebDriverWait(browser, 20)
    browser.get(url + "/dashboard")
    browser.execute_script("sessionStorage.clear()")  # a kiosk's fresh start
    browser.get("about:blank")
    browser.get(url + "/dashboard")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "enter the API token"))
    browser.get("about:blank")
    browser.get(f"{url}/dashboard#token={TOKEN}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
    assert TOKEN not in browser.current_url and browser.current_url == url + "/dashboard"
    browser.refresh()  # the tab keeps it, as a typed one
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)")
@pytest.mark.parametrize("root_path", ["", "/qc"])
def test_dashboard_works_behind_a_proxy_that_serves_it_under_a_path(
    detector: Any, browser: Any, samples: Samples, tmp_path: Path, root_path: str
) -> None:
    """A line's reverse proxy often serves the service under a path of its own
    (https://hmi/qc/). The dashboard was opened at /qc/ and sent to /dashboard, the proxy's
    root; opened at /qc/dashboard it asked /v1/... there, none of which is the service, and
    showed nothing. It follows its own address: every call, image and heat map under /qc/.
    With `serve --root-path /qc` the API's image and heat-map URLs carry the prefix too, so a
    client behind the proxy fetches them as given (they were the service's own paths)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), root_path=root_path),
                     detector=detector)
    state = app.state.diffqc
    wait = WebDriverWait(browser, 20)
    with serving(app, root_path) as url, behind_nginx(url, tmp_path / "nginx") as proxy:
        browser.get(proxy + "/qc/")
        assert browser.current_url == proxy + "/qc/dashboard"
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "connect").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
        body, ftype = samples.one("REVIEW")
        r = httpx.post(proxy + "/qc/v1/inspect", content=body, headers=AUTH,
                       params={"feature_type": ftype, "part_id": "proxied-1"})
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        image_url = r.json()["image_url"]
        assert image_url == f"{root_path}/v1/results/{rid}/image"
        if root_path:  # the URL as given, through the proxy
            fetched = httpx.get(proxy + image_url, headers=AUTH)
            assert fetched.status_code == 200 and fetched.headers["content-type"].startswith("image/")
        row = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')))
        assert "proxied-1" in row.text
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#rates tr[data-type="{ftype}"]')))
        card = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]')))
        wait.until(lambda d: all(
            (img.get_attribute("src") or "").startswith("blob:")
            and d.execute_script("return arguments[0].naturalWidth", img) > 0
            for img in card.find_elements(By.TAG_NAME, "img")))
        card.find_element(By.CSS_SELECTOR, ".verdict-good").click()
        wait.until(ec.staleness_of(card))
        assert state.store.get(rid).review == "GOOD"
        severe = [e for e in browser.get_log("browser")  # the first call, before the token: 401
                  if e.get("level") == "SEVERE" and "401" not in e.get("message", "")]
        assert severe == []
        # the API's page too: its files, and the calls it tries, under /qc/
        op = try_out(browser, proxy + "/qc/docs", "get_model")
        assert executed(browser, op) == (200, proxy + "/qc/v1/model")


def test_dashboard_says_when_a_disk_is_nearly_full(detector: Any, browser: Any, tmp_path: Path) -> None:
    """The operators see the store's disk running low before parts stop being stored (here:
    below a threshold larger than any disk); hidden while there is room."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    wait = WebDriverWait(browser, 20)
    for limit, shown in ((2**60, True), (0, False)):
        folder = tmp_path / str(limit)
        app = create_app(ServiceSettings(db_url=str(folder / "r.db"), tokens=(TOKEN,),
                                         disk_min_free_bytes=limit, disk_min_free_ratio=0.0),
                         detector=detector)
        with serving(app) as url:
            open_dashboard(browser, url)
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
            if shown:
                item = wait.until(ec.visibility_of_element_located(
                    (By.CSS_SELECTOR, f'#disk li[data-path="{folder}"]')))
                assert "GB free" in item.text and "Nearly full" in browser.find_element(By.ID, "disk").text
            else:
                time.sleep(3)  # a few polls of /v1/line
                assert not browser.find_element(By.ID, "disk").is_displayed()
                assert not browser.find_element(By.ID, "certificate").is_displayed()  # no TLS


def test_dashboard_names_the_types_parts_went_without(detector: Any, browser: Any, samples: Samples,
                                                       tmp_path: Path) -> None:
    """With ``--part-timeout`` the operators see which types parts went without (a camera
    missing triggers), how many and when last; hidden while no part was overdue. With
    ``--part-types``, the latest parts count a part's types among the line's: a crop of another
    type (sent by mistake) is not one of them; their heading says what the levels per crop mean
    for a part judged by the worst of its crops of those types (flagged up to k times as often)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    wait = WebDriverWait(browser, 20)
    body, ftype = samples.one("PASS")
    other, stray = [t for t in detector.classes_ if t != ftype][:2]
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), part_timeout_s=0.3,
                                     calibration_poll_s=0.1, part_types=(ftype, other)), detector=detector)
    with serving(app) as url:
        open_dashboard(browser, url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
        time.sleep(2)  # a few polls of /v1/line: no part overdue yet
        assert not browser.find_element(By.ID, "overdue").is_displayed()
        for kind in (ftype, stray):
            r = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                           params={"feature_type": kind, "part_id": "M-1"})
            assert r.status_code == 200, r.text
        row = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, f'#overdue tbody tr[data-type="{other}"]')))
        assert [td.text for td in row.find_elements(By.TAG_NAME, "td")][:2] == [other, "1"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#overdue tbody tr")
        assert [r.get_attribute("data-type") for r in rows] == [other]
        assert "a camera missing triggers" in browser.find_element(By.ID, "overdue").text
        part = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, '#parts tbody tr[data-part="M-1"]')))
        assert [td.text for td in part.find_elements(By.TAG_NAME, "td")][2:4] == ["1 of 2", other]
        review = detector.calibration_.config.alpha_review
        assert (f"a part's verdict is the worst of its types' latest crops: with {review * 100:g} % of "
                f"each type's GOOD crops flagged, a GOOD part of its 2 types is flagged in up to "
                f"{2 * review * 100:g} %" in browser.find_element(By.CSS_SELECTOR, "#parts h2").text)


def test_dashboard_says_when_the_tls_certificate_expires_soon(detector: Any, browser: Any,
                                                              tmp_path: Path) -> None:
    """A certificate that expires within days is shown to whoever has the dashboard open, with
    the date: once it expires the browsers refuse the page."""
    import datetime as dt

    import trustme
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    pem = tmp_path / "server.pem"
    leaf = trustme.CA().issue_cert("localhost", not_after=until)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), tls_cert=pem),
                     detector=detector)
    with serving(app) as url:  # the page's panel, served here over HTTP
        open_dashboard(browser, url)
        panel = WebDriverWait(browser, 20).until(ec.visibility_of_element_located((By.ID, "certificate")))
        assert "expires on " + until.astimezone().strftime("%Y-%m-%d") in panel.text, panel.text
        assert "in 2 days" in panel.text or "in 3 days" in panel.text, panel.text


def test_dashboard_follows_a_retrained_model(service_model: tuple[Path, Path], browser: Any,
                                             tmp_path: Path) -> None:
    """The dashboard read the model (its version, the levels it decides at) once, when it
    connected: after a calibration or a model the service took without a restart it showed the
    old ones until the page was reloaded. It reads them again when `/v1/line` says the service
    took a new one."""
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), model_path=served))
    with serving(app) as url:
        open_dashboard(browser, url)
        wait = WebDriverWait(browser, 30)
        first = app.state.diffqc.model_version
        wait.until(lambda d: d.find_element(By.ID, "model-version").text == first)
        time.sleep(6)  # a poll of /v1/line has seen the model served at first
        bench.retrain_into(served, service_model[0], "retrained-dash")
        wait.until(lambda d: d.find_element(By.ID, "model-version").text == "retrained-dash")


def test_dashboard_follows_a_restarted_service(service_model: tuple[Path, Path], browser: Any,
                                              samples: Samples, tmp_path: Path) -> None:
    """A line-side screen stays open for weeks while the service behind it is restarted (an
    update, the plant's database instead of the pilot's file, another model). The dashboard said
    "Failed to fetch" while the service was down and went on saying it once it was back, and it
    kept what it had read of the service it first connected to: its rows (a new store's parts,
    numbered from 1, never shown beside them), its model. It says the service does not answer,
    and reads the service at its address anew once one answers there."""
    import shutil

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    port = bench.free_port()
    # the page is reloaded under the waits: an element found before it is gone after it
    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))

    pilot = create_app(ServiceSettings(db_url=str(tmp_path / "pilot.db"), tokens=(TOKEN,), model_path=served))
    with serving(pilot, port=port) as url:
        for i in range(3):
            send_part(url, samples, f"pilot-{i}")
        open_dashboard(browser, url)
        wait.until(lambda d: parts_shown(d) == ["pilot-2", "pilot-1", "pilot-0"])
        first = pilot.state.diffqc.model_version
        wait.until(lambda d: d.find_element(By.ID, "model-version").text == first)
    wait.until(lambda d: "the service does not answer" in d.find_element(By.ID, "status").text)

    bench.retrain_into(served, service_model[0], "after-restart")
    plant = create_app(ServiceSettings(db_url=str(tmp_path / "plant.db"), tokens=(TOKEN,), model_path=served))
    with serving(plant, port=port) as url:
        send_part(url, samples, "plant-0")
        wait.until(lambda d: parts_shown(d) == ["plant-0"])
        wait.until(lambda d: d.find_element(By.ID, "model-version").text == "after-restart")
        wait.until(lambda d: "does not answer" not in d.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status")
        assert "connected" in status.text and "err" not in (status.get_attribute("class") or ""), status.text


def test_dashboard_reloads_only_once_its_page_is_served(detector: Any, browser: Any, samples: Samples,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A service that answers and falls over again (a restart loop: systemd's every 5 s) was read
    anew at once, and a reload that finds no page leaves the browser's own error page, which does
    not try again: the line-side screen stayed "This site can't be reached" after the service was
    mended. It reloads only once the new service gives its page; until then it polls as before."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service import app as app_module

    port = bench.free_port()
    wait = WebDriverWait(browser, 30)

    with serving(own_service(detector, tmp_path / "first.db"), port=port) as url:
        body, ftype = samples.one("PASS")
        httpx.post(url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        open_dashboard(browser, url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
        # the first service's line read (its start time, which the second's is told from): the
        # page reads it before it says "connected" (it did not, and on a busy machine took the
        # second service for the one it had connected to: the test of connecting, below)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#drift tbody tr")))
    monkeypatch.setattr(app_module, "STATIC_DIR", tmp_path / "no-page")  # its /dashboard: 500
    with serving(own_service(detector, tmp_path / "second.db"), port=port) as url:
        assert httpx.get(url + "/dashboard").status_code == 500
        time.sleep(7)  # more than a poll of /v1/line, which the second service answers
        assert browser.find_element(By.ID, "status").is_displayed()  # the dashboard still, polling
        monkeypatch.undo()  # the page served again: read anew
        wait.until(status_says("connected to the service restarted at"))


def test_dashboard_says_connected_only_once_it_knows_which_service_it_reads(detector: Any, browser: Any,
                                                                            samples: Samples,
                                                                            tmp_path: Path) -> None:
    """The dashboard said "connected" once it had read the model; only its first read of
    `/v1/line`, a moment later, learnt the service's start time, from which a restart is told. A
    service restarted in that moment (or a `/v1/line` that failed then) was taken for the one it
    had connected to: the first one's parts stayed on the screen and the next one's, numbered
    from 1 in its own store, were never shown. And a first read that failed (a service that fell
    over again as the page was read anew after a restart) left the screen "not connected" for
    good, trying nothing more. It reads the start time first and says "connected" after, and it
    tries to connect again by itself. The moment is held open here by the browser refusing the
    page's calls to `/v1/line` (Chromium's DevTools), the services before and after it real."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait


    port = bench.free_port()
    wait = WebDriverWait(browser, 30)

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/line"]})
    with serving(own_service(detector, tmp_path / "first.db"), port=port) as url:
        send_part(url, samples, "first-0")
        open_dashboard(browser, url)
        wait.until(status_says("does not answer"))
        time.sleep(2)  # a poll of the results, had the page gone on
        assert "connected" not in browser.find_element(By.ID, "status").text
        assert parts_shown(browser) == []
    with serving(own_service(detector, tmp_path / "second.db"), port=port) as url:
        send_part(url, samples, "second-0")
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        wait.until(lambda d: parts_shown(d) == ["second-0"])
        wait.until(status_says("connected"))


def test_dashboard_keeps_a_reviewers_typed_note_across_a_restart(detector: Any, browser: Any,
                                                                  samples: Samples, tmp_path: Path) -> None:
    """A reviewer typing a note on a part when the service is restarted (an update): the screen
    read the new service anew at once, and the note was gone. It waits until what was typed is
    sent or cleared, and says so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    port = bench.free_port()
    wait = WebDriverWait(browser, 30)
    settings = ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,))
    body, ftype = samples.one("REVIEW")
    with serving(create_app(settings, detector=detector), port=port) as url:
        sent = httpx.post(url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        rid = sent.json()["id"]
        open_dashboard(browser, url)
        row = (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')
        wait.until(ec.element_to_be_clickable(row)).click()
        note = wait.until(ec.visibility_of_element_located((By.ID, "part-note")))
        note.send_keys("streak at the left edge, as on the part before")
    with serving(create_app(settings, detector=detector), port=port):
        wait.until(status_says("once what is typed here is sent or cleared"))
        typed = browser.find_element(By.ID, "part-note")
        assert (typed.get_attribute("value") or "").startswith("streak at the left")
        typed.clear()
        wait.until(status_says("connected to the service restarted at"))  # reloaded under the wait


def test_dashboard_says_two_services_answer_by_turns(detector: Any, browser: Any, tmp_path: Path) -> None:
    """Two services behind one proxy address (a balancer given two upstreams) answer the screen by
    turns: read anew whenever another service answers, it would reload for ever. It is read anew
    once and then says what it sees; with both gone, the proxy's 502 is said as the service not
    answering, not as an error of the page."""
    from contextlib import ExitStack

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    wait = WebDriverWait(browser, 30)
    with ExitStack() as services:
        ends = [services.enter_context(serving(create_app(
            ServiceSettings(db_url=str(tmp_path / f"{name}.db"), tokens=(TOKEN,)), detector=detector)))
            for name in ("one", "two")]
        with behind_nginx(ends, tmp_path / "nginx") as proxy:
            browser.get(proxy + "/qc/dashboard")
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.ID, "connect").click()
            turns = "two services answer at this address by turns"
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), turns))
            time.sleep(6)  # more polls of /v1/line, each from the other service: no reload
            assert turns in browser.find_element(By.ID, "status").text
            services.close()
            wait.until(ec.text_to_be_present_in_element(
                (By.ID, "status"), "the service does not answer (502 from the proxy in front of it) since "))


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("DIFFQC_TEST_POSTGRES_URL"),
                    reason="DIFFQC_TEST_POSTGRES_URL is not set")
def test_dashboard_says_when_the_service_answers_again(detector: Any, browser: Any,
                                                       private_cluster: tuple[str, Any],
                                                       tmp_path: Path) -> None:
    """The database restarted under a running service (an update at night): the screen said the
    service's 503 and went on saying it, in red, once everything worked again, so the morning
    shift read a line still down. It says when the service answers again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    db_url, ctl = private_cluster
    app = create_app(ServiceSettings(db_url=db_url, tokens=(TOKEN,), data_dir=str(tmp_path / "kept")),
                     detector=detector)
    wait = WebDriverWait(browser, 30)
    with serving(app) as url:
        open_dashboard(browser, url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected"))
        ctl("stop")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "503 "))
        ctl("start")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "connected again at "))
        assert "err" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")


def test_dashboard_says_when_the_served_bundle_cannot_be_served(service_model: tuple[Path, Path],
                                                                browser: Any, tmp_path: Path) -> None:
    """A bundle changed in the served folder that cannot be served (a setting of the scores
    edited into config.json: the next start refuses it) was said in the log and `/v1/line`
    alone, where the QC engineer who edited it does not look; the dashboard shows it until the
    bundle is mended, and /metrics says it to Prometheus's alert."""
    import json
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), model_path=served))
    original = (served / "config.json").read_text()
    config = json.loads(original)
    config["scoring"]["topk"] = 0.2
    with serving(app) as url:
        open_dashboard(browser, url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "model-version").text)
        assert not browser.find_element(By.ID, "bundle").is_displayed()
        (served / "config.json").write_text(json.dumps(config))
        panel = wait.until(ec.visibility_of_element_located((By.ID, "bundle")))
        assert "config.json was edited after training: scoring.topk is 0.2" in panel.text, panel.text
        refused = 'diffqc_bundle_change_refused{watch="model"}'  # the DiffqcBundleChangeRefused alert's
        assert bench.metric(httpx.get(url + "/metrics", headers=AUTH).text, refused) == 1
        (served / "config.json").write_text(original)
        wait.until(ec.invisibility_of_element_located((By.ID, "bundle")))
        assert bench.metric(httpx.get(url + "/metrics", headers=AUTH).text, refused) == 0


def test_dashboard_says_why_a_kept_image_is_not_shown(detector: Any, browser: Any, samples: Samples,
                                                      tmp_path: Path) -> None:
    """A kept image the service cannot give (its file not in this service's --data-dir: a history
    copied from a pilot's store) was an empty frame in the review queue and the part's view, the
    reviewer left to guess; the frame now says what the service said."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    art = tmp_path / "art"
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), data_dir=str(art),
                                     keep_images="all", heatmaps="all"), detector=detector)
    body, ftype = samples.one("REVIEW")
    with serving(app) as url:
        sent = httpx.post(url + "/v1/inspect", content=body, headers=AUTH, params={"feature_type": ftype})
        rid = sent.json()["id"]
        next((art / "images").iterdir()).unlink()
        open_dashboard(browser, url)
        said = WebDriverWait(browser, 20).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"] .not-shown')))
        assert said.text.startswith("part image not shown: 404 result "), said.text
        assert "--data-dir" in said.text, said.text
        heat = browser.find_element(By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"] img.heatmap')
        WebDriverWait(browser, 20).until(
            lambda d: d.execute_script("return arguments[0].naturalWidth", heat) > 0)


def test_dashboard_shows_a_12_bit_cameras_part_as_the_model_reads_it(mono12_model: tuple[Path, Path],
                                                                      browser: Any, tmp_path: Path) -> None:
    """A 12-bit camera's part (16-bit files, a model trained at the gain train names) was shown in
    the part's view as the browser draws its file, nearly black: the reviewer judged a dark
    square. The screen asks for the kept image as the model reads it (`?view=model`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.model import Detector
    from diffqc.service.app import ServiceSettings, create_app

    model, data = mono12_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector.load(model, device="cpu")
    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,)), detector=det)
    blob = sorted((data / "dots" / "test" / "blob").glob("*.png"))[0]
    with serving(app) as url:
        sent = httpx.post(url + "/v1/inspect", content=blob.read_bytes(), headers=AUTH,
                          params={"feature_type": "dots"})
        assert sent.json()["decision"] != "PASS", sent.text
        rid = sent.json()["id"]
        open_dashboard(browser, url)
        row = WebDriverWait(browser, 20).until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')))
        row.click()  # the part's view: its kept image and heat map
        image = WebDriverWait(browser, 20).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#part img.part-image")))
        WebDriverWait(browser, 20).until(
            lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
        mean = browser.execute_script(
            "const img = arguments[0], c = document.createElement('canvas');"
            "c.width = img.naturalWidth; c.height = img.naturalHeight;"
            "const g = c.getContext('2d'); g.drawImage(img, 0, 0);"
            "const d = g.getImageData(0, 0, c.width, c.height).data; let s = 0;"
            "for (let i = 0; i < d.length; i += 4) s += d[i]; return s / (d.length / 4);", image)
        assert mean > 100, mean


def test_the_dashboard_fits_a_line_pcs_screen(live_server: tuple[str, Any], browser: Any,
                                              samples: Samples) -> None:
    """At 1366 x 768 (a line PC's or HMI's screen) the latest parts' table of a part missing
    most of its types, or one with a long id (a lot and serial number), ran past the page's right
    edge: the page scrolled sideways and the last column went off screen. A wide table now
    scrolls inside its own panel and the missing types wrap; the page is no wider than the
    screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = live_server
    browser.set_window_size(1366, 768)
    wait = WebDriverWait(browser, 20)
    flagged, ftype = samples.one("REVIEW")
    long_id = "LOT-2026-12-04-LINE-3-PRINTER-SOUTH/" + "S" * 120
    for part in ("P-1", long_id):
        r = httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                       params={"feature_type": ftype, "part_id": part})
        assert r.status_code == 200, r.text
    open_dashboard(browser, url)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#parts tbody tr[data-part="P-1"]')))
    time.sleep(1)
    width, scrolled = browser.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollWidth]")
    assert scrolled <= width, (scrolled, width)
    # the part's view: its heat-map panel (the part and its overlay side by side) was drawn in a
    # 256 px square, the overlay the reviewer judges 125 px wide beside a 256 px part
    browser.find_element(By.CSS_SELECTOR, "#decisions tbody tr").click()
    heat = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#part img.heatmap")))
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", heat) > 0)
    drawn = drawn_width(browser, heat)
    assert drawn >= 480, drawn


def test_a_part_is_opened_and_reviewed_from_the_keyboard(live_server: tuple[str, Any], browser: Any,
                                                        samples: Samples) -> None:
    """A line PC's reviewer working from the keyboard could not open a part: the live decisions'
    and latest parts' rows took a mouse click only (Tab passed them by). A row is reached with
    Tab and opened with Enter, the part's view then takes the keys (Tab to the note and GOOD),
    and Escape closes it, back on the row."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    flagged, ftype = samples.one("REVIEW")
    rid = httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                     params={"feature_type": ftype, "part_id": "k-1"}).json()["id"]
    open_dashboard(browser, url)
    wait = WebDriverWait(browser, 20)
    row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')))

    def focused() -> Any:
        return browser.switch_to.active_element

    browser.find_element(By.ID, "find").click()
    for _ in range(5):  # from the find field, Tab: its button, then the first row
        focused().send_keys(Keys.TAB)
        if focused() == row:
            break
    assert focused() == row
    row.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "part").is_displayed()
               and d.find_element(By.ID, "part").get_attribute("data-id") == str(rid))
    for _ in range(20):
        if focused().get_attribute("id") == "part-note":
            break
        focused().send_keys(Keys.TAB)
    assert focused().get_attribute("id") == "part-note"
    focused().send_keys("seen on the keyboard")
    for _ in range(5):
        focused().send_keys(Keys.TAB)
        if focused().get_attribute("data-verdict") == "GOOD":
            break
    focused().send_keys(Keys.ENTER)
    wait.until(lambda d: state.store.get(rid).review == "GOOD")
    assert state.store.get(rid).review_note == "seen on the keyboard"
    focused().send_keys(Keys.ESCAPE)
    wait.until(lambda d: not d.find_element(By.ID, "part").is_displayed())
    assert focused().get_attribute("data-id") == str(rid)
    # the latest parts' row too
    part = browser.find_element(By.CSS_SELECTOR, '#parts tbody tr[data-part="k-1"]')
    part.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "part").is_displayed())
    # the review queue: a verdict given from the keyboard leaves the keys on the next card's GOOD
    first, second = (httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                                params={"feature_type": ftype, "part_id": f"k-{i}"}).json()["id"]
                     for i in (2, 3))
    good = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#review-queue .card[data-id="{second}"] .verdict-good')))
    browser.find_element(By.CSS_SELECTOR, f'#review-queue .card[data-id="{first}"] .verdict-bad').send_keys(
        Keys.ENTER)
    wait.until(lambda d: state.store.get(first).review == "BAD")
    wait.until(lambda d: focused() == good)
    focused().send_keys(Keys.ENTER)
    wait.until(lambda d: state.store.get(second).review == "GOOD")


def test_a_reviewer_gives_verdicts_with_one_key(live_server: tuple[str, Any], browser: Any,
                                                samples: Samples) -> None:
    """A reviewer at a line PC working down the queue from the keyboard pressed Tab to a card's
    GOOD or BAD and Enter for each part. G and B give the verdict of the card or part's view the
    keys are in (not while typing a note or a defect kind)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = live_server
    flagged, ftype = samples.one("REVIEW")
    first, second, third = (httpx.post(url + "/v1/inspect", content=flagged, headers=AUTH,
                                       params={"feature_type": ftype, "part_id": f"g-{i}"}).json()["id"]
                            for i in (1, 2, 3))
    open_dashboard(browser, url)
    # the focused element is read under the waits while a verdict's card leaves the queue: the
    # one read may be gone by the next call (a busy machine's CI run met it)
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    for rid in (first, second, third):
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]')))

    def focused() -> Any:
        return browser.switch_to.active_element

    card = browser.find_element(By.CSS_SELECTOR, f'#review-queue .card[data-id="{first}"]')
    card.find_element(By.CSS_SELECTOR, "input.defect").send_keys("bubble")  # typed: no verdict
    assert state.store.get(first).review is None
    card.find_element(By.CSS_SELECTOR, "input.defect").send_keys(Keys.SHIFT, Keys.TAB)  # back to BAD
    focused().send_keys("b")
    wait.until(lambda d: state.store.get(first).review == "BAD")
    assert state.store.get(first).review_defect == "bubble"
    wait.until(lambda d: focused().get_attribute("class") == "verdict-good")  # the next card's
    focused().send_keys("g")
    reviewed = wait.until(lambda d: next((r for r in (second, third) if state.store.get(r).review), None))
    assert state.store.get(reviewed).review == "GOOD"
    # the part's view, opened from its row with Enter: the note takes a g as a letter, the view a verdict
    other = third if reviewed == second else second
    row = browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{other}"]')
    browser.execute_script("arguments[0].focus()", row)
    row.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "part").get_attribute("data-id") == str(other))
    assert focused().get_attribute("id") == "part"  # the view took the keys
    focused().send_keys("b")
    wait.until(lambda d: state.store.get(other).review == "BAD")
    browser.find_element(By.ID, "part-note").send_keys("glare, not a defect")  # changed, with a note
    assert state.store.get(other).review == "BAD"
    browser.find_element(By.ID, "part-note").send_keys(Keys.TAB, Keys.TAB)  # past the defect kind
    assert focused().get_attribute("data-verdict") == "GOOD"
    focused().send_keys("g")
    wait.until(lambda d: state.store.get(other).review == "GOOD")
    assert state.store.get(other).review_note == "glare, not a defect"


def try_out(browser: Any, page: str, operation: str) -> Any:
    """The API's page (Swagger UI) at ``page``, the token given ("Authorize"), one operation
    (its operationId) opened for "Try it out": its element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page)
    wait = WebDriverWait(browser, 20)
    op = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'.opblock[id$="-{operation}"]')))
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input"))).send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .close-modal").click()
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: op.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    return op


def executed(browser: Any, op: Any) -> tuple[int, str]:
    """An operation of the API's page sent ("Execute"): the status it answered, the URL it asked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    op.find_element(By.CSS_SELECTOR, ".execute").click()
    status = WebDriverWait(browser, 20).until(lambda d: [e.text for e in op.find_elements(
        By.CSS_SELECTOR, ".live-responses-table .response-col_status")][1:])
    return int(status[0]), str(op.find_element(By.CSS_SELECTOR, ".request-url pre").text)


def test_the_api_page_inspects_a_part_offline(live_server: tuple[str, Any], browser: Any, samples: Samples,
                                              tmp_path: Path) -> None:
    """An integrator opens /docs (Swagger UI, as FastAPI serves it), gives the token and sends a
    part from the page: its script and style sheet come from the service itself (a factory
    network reaches no CDN), and the part is inspected and stored."""
    from selenium.webdriver.common.by import By

    url, state = live_server
    body, ftype = samples.one("PASS")
    part = tmp_path / "part.png"
    part.write_bytes(body)
    op = try_out(browser, url + "/docs", "inspect")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(u.startswith(url + "/") for u in loaded), loaded
    op.find_element(By.CSS_SELECTOR, 'input[placeholder="feature_type"]').send_keys(ftype)
    op.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys(str(part))  # the raw body
    assert executed(browser, op) == (200, url + f"/v1/inspect?feature_type={ftype}")
    (stored,) = state.store.query(limit=None)
    assert (stored.feature_type, stored.source) == (ftype, "http") and stored.decision == "PASS"
    # a batch of two, the type given once in the query: Swagger UI sent its placeholder "string"
    # as a per-image type (422 unknown type 'string') and an empty form field overrode the query
    op = try_out(browser, url + "/docs", "inspect_batch")
    images = next(r for r in op.find_elements(By.CSS_SELECTOR, "tr") if r.text.startswith("image"))
    images.find_element(By.XPATH, ".//button[contains(., 'Add')]").click()  # a second file
    for field in images.find_elements(By.CSS_SELECTOR, 'input[type="file"]'):
        field.send_keys(str(part))
    op.find_element(By.CSS_SELECTOR, 'input[placeholder="feature_type"]').send_keys(ftype)
    assert executed(browser, op)[0] == 200
    assert [(r.feature_type, r.type_known) for r in state.store.query(limit=None)][:2] == [(ftype, True)] * 2
    # a verdict from the body the page starts from: it was every field "string" (a defect kind
    # with GOOD: 422) and "replaces" a verdict the part never had (409)
    op = try_out(browser, url + "/docs", "review")
    op.find_element(By.CSS_SELECTOR, 'input[placeholder="record_id"]').send_keys(str(stored.id))
    assert executed(browser, op)[0] == 200
    given = state.store.get(stored.id)
    assert (given.review, given.review_defect) == ("BAD", "crack") and given.reviewer


def test_a_verdict_not_stored_is_said_where_it_was_given(detector: Any, browser: Any, samples: Samples,
                                                         tmp_path: Path) -> None:
    """A reviewer on a phone taps GOOD while the service is down (restarting after an update): the
    card stayed, and why the verdict was not stored was said in the status line only, at the top of
    the page, far above the queue; the card looked as if the tap had been missed. The card (and
    the part's view, alike) now says it under its buttons, until a verdict is stored."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,)), detector=detector)
    body, ftype = samples.one("REVIEW")
    on_a_phone(browser)
    wait = WebDriverWait(browser, 20)
    port = bench.free_port()
    with serving(app, port=port) as url:
        rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                         params={"feature_type": ftype}).json()["id"]
        open_dashboard(browser, url)
        card = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]')))
        browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]').click()
        wait.until(lambda d: d.find_element(By.ID, "part").is_displayed())

    def said_in_view(box: Any, tap: Any) -> str:
        browser.execute_script("arguments[0].scrollIntoView()", tap)
        tap.click()
        said = wait.until(lambda d: box.find_element(By.CSS_SELECTOR, ".said").text)
        top, bottom = browser.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom];",
            box.find_element(By.CSS_SELECTOR, ".said"))
        assert top >= 0 and bottom <= PHONE[1], (top, bottom)  # in view, where the tap was
        return str(said)

    good = card.find_element(By.CSS_SELECTOR, ".verdict-good")
    assert said_in_view(card, good).startswith("not stored: the service does not answer")
    view = browser.find_element(By.ID, "part-verdict")
    assert said_in_view(view, view.find_element(By.CSS_SELECTOR, '[data-verdict="BAD"]')).startswith(
        "not stored: the service does not answer")
    with serving(app, port=port):
        good.click()
        wait.until(lambda d: app.state.diffqc.store.get(rid).review == "GOOD")


def test_a_review_card_says_when_no_image_was_kept(detector: Any, browser: Any, samples: Samples,
                                                   tmp_path: Path) -> None:
    """A service that keeps no images (`--keep-images none --heatmaps none`) showed each review
    card with two empty black frames, as if the pictures were still loading; the card now says
    that none was kept, as the part's view does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), keep_images="none",
                                     heatmaps="none"), detector=detector)
    body, ftype = samples.one("REVIEW")
    with serving(app) as url:
        rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                         params={"feature_type": ftype}).json()["id"]
        open_dashboard(browser, url)
        card = WebDriverWait(browser, 20).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]')))
        assert card.find_elements(By.TAG_NAME, "img") == []
        assert "No image or heat map kept for this part." in card.text, card.text


def test_a_part_is_reviewed_on_a_phone(detector: Any, browser: Any, samples: Samples, tmp_path: Path) -> None:
    """A shift leader walking the line reviews on a phone (390 x 844 CSS pixels): the live
    decisions showed the record id, time, part and type, the decision itself behind a sideways
    scroll, and a review card was its two pictures side by side with the GOOD and BAD buttons
    and the part's details beyond the screen's edge. On a narrow screen the decision is in view
    and a card's pictures sit above its details and buttons, which a tap reaches."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,),
                                     data_dir=str(tmp_path / "art"), keep_images="all", heatmaps="all"),
                     detector=detector)
    body, ftype = samples.one("REVIEW")
    on_a_phone(browser)
    with serving(app) as url:
        rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                         params={"feature_type": ftype, "part_id": "LOT-2026-12-06-PART-00017"}).json()["id"]
        open_dashboard(browser, url)
        wait = WebDriverWait(browser, 20)
        card = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'#review-queue .card[data-id="{rid}"]')))
        for img in card.find_elements(By.TAG_NAME, "img"):
            wait.until(lambda d, img=img: d.execute_script("return arguments[0].naturalWidth", img) > 0)
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert width == PHONE[0], width

        def right(element: Any) -> float:
            return float(browser.execute_script("return arguments[0].getBoundingClientRect().right", element))

        badge = browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"] .badge')
        assert 0 < right(badge) <= width, (right(badge), width)
        for what in ("img.part-image", "img.heatmap", ".verdict-good", ".verdict-bad", "input.defect"):
            shown = card.find_element(By.CSS_SELECTOR, what)
            assert 0 < right(shown) <= width, (what, right(shown), width)
        # the heat-map panel (the part and its overlay side by side) drawn as wide as it may be:
        # its overlay half was 85 px of the screen's 390 in a square frame
        drawn = drawn_width(browser, card.find_element(By.CSS_SELECTOR, "img.heatmap"))
        assert drawn > 0.5 * width, (drawn, width)
        card.find_element(By.CSS_SELECTOR, "input.defect").send_keys("smear")
        card.find_element(By.CSS_SELECTOR, ".verdict-bad").click()
        wait.until(ec.staleness_of(card))
        stored = app.state.diffqc.store.get(rid)
        assert (stored.review, stored.review_defect) == ("BAD", "smear"), stored
        # the part's view, a tap on its decision: its pictures within the screen too
        browser.find_element(By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]').click()
        for what in ("img.part-image", "img.heatmap"):
            shown = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#part {what}")))
            assert 0 < right(shown) <= width, (what, right(shown), width)
        # its headings in two lines at most, as the dashboard's (its pictures' and its verdicts')
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#part-crops").is_displayed())
        lines = browser.execute_script(
            "return [...document.querySelectorAll('#part h2, #part h3')].filter(h => h.offsetParent)"
            ".map(h => [h.innerText, Math.round(h.getBoundingClientRect().height / "
            "parseFloat(getComputedStyle(h).lineHeight))]);")
        heads = [text.split(" (")[0] for text, _ in lines]
        assert heads == [f"Part #{rid} REVIEW close", "This part's images", "Verdicts given"], lines
        assert all(n <= 2 for _, n in lines), lines


def test_a_phone_shows_the_decisions_under_a_short_header(detector: Any, browser: Any, samples: Samples,
                                                         tmp_path: Path) -> None:
    """On a phone the header (title, model, queue, reviewer, and the token's form, kept after a
    token was taken) was 201 of the screen's 844 pixels, and the live decisions scrolled sideways
    to their score and review (the latest parts to their time). Once connected the form goes (a
    refused token brings it back) and the decisions and parts fit the screen's width."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,)), detector=detector)
    body, ftype = samples.one("REVIEW")
    on_a_phone(browser)
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "America/Argentina/Buenos_Aires"})
    wait = WebDriverWait(browser, 20)
    with serving(app) as url:
        rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                         params={"feature_type": ftype, "part_id": "LOT-2026-12-06-PART-00017"}).json()["id"]
        browser.get(url + "/dashboard")
        form = browser.find_element(By.ID, "token-form")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "enter the API token"))
        assert form.is_displayed()  # asked for
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "connect").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "token refused"))
        assert form.is_displayed()  # asked for again
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "connect").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')))
        assert not form.is_displayed()
        header = browser.execute_script(
            "return document.querySelector('header').getBoundingClientRect().height")
        assert header <= 0.15 * PHONE[1], header
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#parts tbody tr")))
        for box in ("decisions-wrap", "parts"):  # the latest parts too: its last time was past the edge
            wide, room = browser.execute_script(
                "const w = document.getElementById(arguments[0]);"
                "return [w.scrollWidth, w.clientWidth];", box)
            assert wide <= room, (box, wide, room)


def test_a_phone_shows_the_rates_and_drift_without_scrolling_sideways(detector: Any, browser: Any,
                                                                     samples: Samples,
                                                                     tmp_path: Path) -> None:
    """On a phone the rates (8 columns) and the drift watch (9) scrolled sideways within their
    boxes (544 and 683 px in 374), the REJECT count and share flagged, or the state, off the
    screen. They now show what a shift leader reads there (a type's PASS, REVIEW, REJECT and share
    flagged; its drift state, alarms, mis-routed parts and since when), and fit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=str(tmp_path / "r.db"), tokens=(TOKEN,), drift_window=5,
                                     drift_min_parts=5, drift_level=0.01), detector=detector)
    on_a_phone(browser)
    wait = WebDriverWait(browser, 20)
    rejected, ftype = samples.one("REJECT")
    with serving(app) as url:
        for i, (body, kind) in enumerate([(rejected, ftype)] * 6 + samples.all[:8]):  # a drift alarm
            httpx.post(url + "/v1/inspect", content=body, headers=AUTH,  # two cameras: a row each
                       params={"feature_type": kind, "camera": f"cam-{i % 2}-north-hall"})
        open_dashboard(browser, url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#drift tbody tr[data-camera]")))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#drift tbody tr[data-alarm="1"]')))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#rates tbody tr")))
        for table, shown in (("rates", ["type", "PASS", "REVIEW", "REJECT", "flagged"]),
                             ("drift", ["type", "state", "alarms", "mis-routed", "since"])):
            heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, f"#{table} th")
                     if th.is_displayed()]
            assert heads == shown, (table, heads)
            wide, room = browser.execute_script(
                "const w = document.getElementById(arguments[0]).closest('section');"
                "return [w.scrollWidth, w.clientWidth];", table)
            assert wide <= room, (table, wide, room)
        # each heading's explanation in two lines at most (the drift watch's took five, the rates'
        # four, above their tables), what it means kept; a desktop shows the rest
        lines = browser.execute_script(
            "return [...document.querySelectorAll('h2')].filter(h => h.offsetParent).map(h => "
            "[h.innerText, Math.round(h.getBoundingClientRect().height / "
            "parseFloat(getComputedStyle(h).lineHeight))]);")
        assert len(lines) >= 6 and all(n <= 2 for _, n in lines), lines
        said = dict((text.split(" (")[0], text) for text, _ in lines)
        assert "(an alarm: recent parts unlike the calibration set)" in said["Drift watch per feature type"]
        rates = said["Rates per feature type"]
        assert rates.startswith("Rates per feature type (last hour; the calibration flags "), rates
        assert rates.endswith(" % of GOOD parts)"), rates
        assert "(has a camera changed?)" in said["Parts unlike their type's training images"]


def test_the_dashboard_dates_a_part_of_another_day(live_server: tuple[str, Any], browser: Any) -> None:
    """Opened in the morning, the live decisions and latest parts showed last night's parts with
    their time of day only, as if they were this morning's (the date was in a tooltip, which a
    touch panel does not show): a time of another day than the browser's today is dated."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.store import ResultRecord

    url, state = live_server
    now = time.time()
    old, new = state.store.insert_many([
        ResultRecord(created_at=now - 2 * 86400, source="t", decision="REJECT", part_id="night",
                     feature_type="stripes"),
        ResultRecord(created_at=now, source="t", decision="PASS", part_id="morning", feature_type="stripes")])
    browser.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Etc/GMT-3"})
    open_dashboard(browser, url)
    wait = WebDriverWait(browser, 20)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#parts tbody tr[data-part="night"]')))

    def shown(rec: Any) -> str:
        return (dt.datetime.fromtimestamp(rec.created_at, dt.UTC)
                + dt.timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    def cells(selector: str) -> list[str]:
        row = browser.find_element(By.CSS_SELECTOR, selector)
        return [td.text for td in row.find_elements(By.TAG_NAME, "td")]

    assert cells(f'#decisions tbody tr[data-id="{old.id}"]')[1] == shown(old)
    assert cells(f'#decisions tbody tr[data-id="{new.id}"]')[1] == shown(new).split()[1]  # today's
    assert cells('#parts tbody tr[data-part="night"]')[-1] == shown(old)
    assert cells('#parts tbody tr[data-part="morning"]')[-1] == shown(new).split()[1]


def test_an_hmi_page_of_another_origin_reads_the_api_and_when_to_retry(
    detector: Any, browser: Any, samples: Samples, tmp_path: Path
) -> None:
    """An HMI developer's page on its own origin, allowed with `--cors-origin`, calls the API from
    Chromium: it sends a part (a preflighted upload with the token and an Idempotency-Key), reads
    its record and kept image, gives a verdict, and reads the errors' bodies. A 503's `Retry-After`,
    which docs/API.md has a client wait by, read as `null`: a browser hands a page of another
    origin only the headers the service exposes to it. It is exposed."""
    import base64

    from diffqc.service.app import ServiceSettings, create_app

    hmi_port = bench.free_port()
    origin = f"http://127.0.0.1:{hmi_port}"
    script = """
        const [api, image, done] = arguments;
        const auth = {"Authorization": "Bearer %s"};
        const out = {};
        async function call(name, path, options) {
          try {
            const r = await fetch(api + path, options);
            const type = r.headers.get("Content-Type");
            out[name] = [r.status, r.headers.get("Retry-After"), type, await r.text()];
          } catch (e) { out[name] = String(e); }
        }
        (async () => {
          const bytes = Uint8Array.from(atob(image), (c) => c.charCodeAt(0));
          const raw = {...auth, "Content-Type": "application/octet-stream", "Idempotency-Key": "hmi-1"};
          const upload = {method: "POST", body: bytes, headers: raw};
          await call("inspect", "/v1/inspect?feature_type=%s&part_id=hmi-1", upload);
          await call("image", "/v1/results/1/image", {headers: auth});
          const verdict = JSON.stringify({verdict: "GOOD", reviewer: "hmi"});
          const json = {...auth, "Content-Type": "application/json"};
          await call("review", "/v1/review/1", {method: "POST", body: verdict, headers: json});
          await call("missing", "/v1/results/99", {headers: auth});
          await call("no_token", "/v1/results", {});
          done(out);
        })();
    """
    body, ftype = samples.one("PASS")
    browser.set_script_timeout(60)
    page = create_app(ServiceSettings(db_url=str(tmp_path / "page.db"), tokens=(TOKEN,)), detector=detector)
    api = create_app(ServiceSettings(db_url=str(tmp_path / "api.db"), tokens=(TOKEN,), keep_images="all",
                                     cors_origins=(origin,), retry_after_s=7), detector=detector)
    with serving(page, port=hmi_port), serving(api) as api_url:
        browser.get(origin + "/healthz")  # a document of the HMI's origin
        out = browser.execute_async_script(script % (TOKEN, ftype), api_url, base64.b64encode(body).decode())
        assert out["inspect"][0] == 200 and '"part_id":"hmi-1"' in out["inspect"][3], out["inspect"]
        assert out["image"][:3] == [200, None, "image/png"], out["image"][:3]
        assert out["review"][0] == 200 and '"review":"GOOD"' in out["review"][3], out["review"]
        assert out["missing"][0] == 404 and '"code":"not_found"' in out["missing"][3], out["missing"]
        assert out["no_token"][0] == 401 and '"code":"unauthorized"' in out["no_token"][3], out["no_token"]
    stopped = create_app(ServiceSettings(db_url=str(tmp_path / "api.db"), tokens=(TOKEN,),
                                         cors_origins=(origin,), retry_after_s=7), detector=detector)
    with serving(page, port=hmi_port), serving(stopped, lifespan="off") as api_url:  # never started: 503
        browser.get(origin + "/healthz")
        out = browser.execute_async_script(script % (TOKEN, ftype), api_url, base64.b64encode(body).decode())
        assert out["missing"][:2] == [503, "7"], out["missing"]
        assert '"code":"not_ready"' in out["missing"][3], out["missing"]


def test_dashboard_says_when_a_hung_service_does_not_answer(service_model: tuple[Path, Path], browser: Any,
                                                             samples: Samples, tmp_path: Path) -> None:
    """A service that hangs (stopped in a debugger, its machine frozen) keeps its connections open
    and answers nothing: the screen's calls waited for ever, and its status line went on saying
    "connected" while nothing on it moved, as long as the service hung (80 s and more). A read
    given no reply in 15 s is said as the service not answering, and the screen goes on once the
    service answers again. The service here is a real `serve`, stopped with SIGSTOP."""
    import signal

    from selenium.webdriver.support.ui import WebDriverWait

    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN)
    try:
        send_part(srv.url, samples, "before")
        open_dashboard(browser, srv.url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: parts_shown(d) == ["before"])
        wait.until(status_says("connected"))
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            WebDriverWait(browser, 45).until(
                status_says("the service does not answer (no reply in 15 s) since "))
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        send_part(srv.url, samples, "after")
        wait.until(lambda d: parts_shown(d) == ["after", "before"])
        wait.until(status_says("connected again at "))
    finally:
        srv.stop()


def test_a_verdict_typed_before_a_restart_onto_another_store_is_not_given_to_another_part(
    detector: Any, browser: Any, samples: Samples, tmp_path: Path
) -> None:
    """A reviewer typing a note on record #1 when the service was restarted on another store (the
    plant's database instead of the pilot's file): the screen kept the note to be sent, and BAD then
    went to record #1 of the new store, another part, with the reviewer's note. A verdict given on a
    record as it was shown before is not given where that record is now another part: it is said
    not stored, and why; cleared, the screen reads the new service anew."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = bench.free_port()
    wait = WebDriverWait(browser, 30)
    body, ftype = samples.one("REVIEW")
    with serving(own_service(detector, tmp_path / "pilot.db"), port=port) as url:
        rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                         params={"feature_type": ftype, "part_id": "pilot-7"}).json()["id"]
        open_dashboard(browser, url)
        row = (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"]')
        wait.until(ec.element_to_be_clickable(row)).click()
        wait.until(lambda d: "pilot-7" in d.find_element(By.ID, "part").text)
        browser.find_element(By.ID, "part-note").send_keys("deep scratch at the left edge")
    plant = own_service(detector, tmp_path / "plant.db")
    with serving(plant, port=port) as url:
        send_part(url, samples, "plant-1")
        store = plant.state.diffqc.store
        assert store.get(rid).part_id == "plant-1"  # the same record id, another part
        wait.until(status_says("the service was restarted at"))
        browser.find_element(By.CSS_SELECTOR, '#part-verdict [data-verdict="BAD"]').click()
        wait.until(lambda d: store.get(rid).review is not None
                   or d.find_elements(By.CSS_SELECTOR, "#part-verdict .said"))
        assert store.get(rid).review is None, "the verdict went to another part"
        said = browser.find_element(By.CSS_SELECTOR, "#part-verdict .said").text
        assert said.startswith(
            f"not stored: #{rid} is another record (part plant-1) in the service answering now"), said
        note = browser.find_element(By.ID, "part-note")
        assert note.get_attribute("value") == "deep scratch at the left edge"  # to be copied
        note.clear()
        wait.until(status_says("connected to the service restarted at"))
        wait.until(lambda d: parts_shown(d) == ["plant-1"])
        assert store.get(rid).review is None


def test_live_decisions_show_a_verdict_given_at_another_screen(live_server: tuple[str, Any], browser: Any,
                                                               samples: Samples) -> None:
    """Two screens on one line: a verdict given at one (or changed there) never showed in the other's
    live decisions, whose review column was written once, as the row came; a supervisor reading it
    saw the part still unreviewed. The rows shown follow the verdicts given anywhere."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = live_server
    wait = WebDriverWait(browser, 20)
    body, ftype = samples.one("REVIEW")
    rid = httpx.post(url + "/v1/inspect", content=body, headers=AUTH,
                     params={"feature_type": ftype, "part_id": "p-1"}).json()["id"]
    open_dashboard(browser, url)
    cell = (By.CSS_SELECTOR, f'#decisions tbody tr[data-id="{rid}"] .review-cell')
    assert wait.until(ec.presence_of_element_located(cell)).text == ""
    r = httpx.post(f"{url}/v1/review/{rid}", headers=AUTH, json={"verdict": "GOOD", "reviewer": "bob"})
    assert r.status_code == 200  # at another screen
    wait.until(ec.text_to_be_present_in_element(cell, "GOOD"))
    r = httpx.post(f"{url}/v1/review/{rid}", headers=AUTH,
                   json={"verdict": "BAD", "reviewer": "bob", "replaces": "GOOD"})
    assert r.status_code == 200  # changed there
    wait.until(ec.text_to_be_present_in_element(cell, "BAD"))


def test_a_part_id_with_spaces_at_its_ends_is_found(live_server: tuple[str, Any], browser: Any) -> None:
    """A part id a scanner sends with spaces at its ends (a fixed-width code, padded) was never
    found: Find looked for the id typed without them. It looks for it as typed, then without them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffqc.service.store import ResultRecord

    url, state = live_server
    padded, plain = state.store.insert_many([
        ResultRecord(created_at=time.time(), source="t", decision="PASS", part_id=part, feature_type="a")
        for part in ("  A-12 ", "B-3")])
    open_dashboard(browser, url)
    wait = WebDriverWait(browser, 20)
    wait.until(status_says("connected"))
    panel = browser.find_element(By.ID, "part")
    browser.find_element(By.ID, "find").send_keys("  A-12 \n")
    wait.until(lambda d: panel.get_attribute("data-id") == str(padded.id))
    browser.find_element(By.ID, "find").clear()
    browser.find_element(By.ID, "find").send_keys(" B-3 \n")  # spaces typed by mistake
    wait.until(lambda d: panel.get_attribute("data-id") == str(plain.id))


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("DIFFQC_TEST_POSTGRES_URL"),
                    reason="DIFFQC_TEST_POSTGRES_URL is not set")
def test_live_decisions_show_a_part_another_station_committed_late(detector: Any, browser: Any,
                                                                   samples: Samples, tmp_path: Path) -> None:
    """Stations sharing the plant's PostgreSQL: a record's id is given as it is inserted and seen
    once its batch commits, so a station's part can come after another's of a higher id. The live
    decisions asked only for ids above the highest shown, and that part was never shown there. A
    part committed late is shown (in its place by id). Station A's insert is held open here in a
    transaction of the test's own, station B's part sent to the real service meanwhile."""
    import uuid
    from urllib.parse import quote

    import psycopg

    base = os.environ["DIFFQC_TEST_POSTGRES_URL"]
    schema = f"diffqc_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    db_url = f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    try:
        from selenium.webdriver.support.ui import WebDriverWait

        from diffqc.service.app import ServiceSettings, create_app

        wait = WebDriverWait(browser, 20)
        with serving(create_app(ServiceSettings(db_url=db_url, tokens=(TOKEN,)), detector=detector)) as url:
            send_part(url, samples, "first")
            open_dashboard(browser, url)
            wait.until(lambda d: parts_shown(d) == ["first"])
            with psycopg.connect(db_url) as station_a:  # its batch inserted, not yet committed
                station_a.execute("INSERT INTO diffqc_results (created_at, source, decision, part_id, "
                                  "feature_type) VALUES (%s, 'station-a', 'REJECT', 'late', 'stripes')",
                                  (time.time(),))
                send_part(url, samples, "station-b")
                wait.until(lambda d: parts_shown(d) == ["station-b", "first"])
                time.sleep(2)  # polls of the live decisions meanwhile
                station_a.commit()
            wait.until(lambda d: parts_shown(d) == ["station-b", "late", "first"])
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
