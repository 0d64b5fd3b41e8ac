"""The history web page under /ui/ (receiver/ui.py): over HTTP, and in Debian's chromium driven by
selenium (required in CI, skipped elsewhere when chromium or its driver is missing)."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import shutil
import re
import time
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver.models import AlertStatus, NewMessage, SmsText
from receiver.phone import mask
from receiver.pipeline import new_message_id
from receiver.store import HistoryQuery, RecipientUpdate, Result
from receiver.ui import EXPORT_COLUMNS, csv_cell, meaning
from tests.conftest import API_KEY, eventually
from tests.helpers import fixture


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    """Both outboxes: pages, acks, escalations and the history queries are SQL of each."""
    return request.param


USER, PASSWORD, TOKEN = "ops", "s3cret-pw-7781", "tok-5f1e9c2a77"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
ADMIN = {"basic_auth": {"username": USER, "password": PASSWORD}, "bearer_tokens": [TOKEN]}
SHOTS = Path("/tmp/ui-shots")
DAY = 86400.0


def alert(name: str, labels: dict[str, str]) -> bytes:
    """An Alertmanager notification of its own (its own group key and fingerprint)."""
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    a = body["alerts"][0]
    a["labels"] = {"alertname": name, **labels}
    a["fingerprint"] = name
    body["alerts"] = [a]
    body["groupKey"] = f'{{}}:{{alertname="{name}"}}'
    body["groupLabels"] = {"alertname": name}
    body["commonLabels"] = dict(a["labels"])
    return json.dumps(body).encode()


async def get(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with http.get(url, allow_redirects=False, **kw) as r:
        return r.status, dict(r.headers), await r.text()


async def page_out(http: aiohttp.ClientSession, url: str, body: bytes, auth: dict[str, str] | None = None) -> str:
    """Post a webhook; the id of the one message it was planned into."""
    async with http.post(f"{url}/webhook/alertmanager", data=body,
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        nid = (await r.json())["notification"]
    ids: list[str] = []

    async def made() -> bool:
        nonlocal ids
        async with http.get(f"{url}/api/v1/messages", params={"notification": nid}, headers=auth) as r:
            ids = [m["id"] for m in (await r.json())["messages"]]
        return bool(ids)

    await eventually(made)
    return ids[0]


async def message(http: aiohttp.ClientSession, url: str, mid: str,
                  auth: dict[str, str] | None = None) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/messages/{mid}", headers=auth) as r:
        return await r.json()


async def delivered_and_failed(http: aiohttp.ClientSession, fake: Any, url: str,
                               auth: dict[str, str] | None = None) -> str:
    """A page to group "db" whose first member's SMS is delivered (Clickatell's report) and
    whose second is refused with code 105: its message id."""
    await fake.mode(http, reject_numbers={"886911960998": 105})
    mid = await page_out(http, url, alert("DiskFull", {"team": "db", "severity": "warning",
                                                        "instance": "db-1:9100"}), auth)

    async def settled() -> bool:
        return (await message(http, url, mid, auth))["state"] == "partial"

    await eventually(settled)
    api_id = next(m["apiMessageId"] for m in await fake.messages(http) if m["clientMessageId"] == mid)
    async with http.post(f"{url}/callbacks/clickatell/status", json={
            "messageId": api_id, "clientMessageId": mid, "statusCode": 4,
            "status": "RECEIVED_BY_RECIPIENT"}) as r:
        assert r.status == 200
    return mid


def listed(html: str) -> list[tuple[str, str]]:
    """(group, text) of each row of the list."""
    return [(g, unescape(t)) for g, t in re.findall(
        r'<td class="time">.*?</td>\s*<td>([^<]*)</td>.*?<td class="text">([^<]*)</td>', html, re.S)]


def stored(group: str, text: str, recipients: tuple[str, ...] = ("+14155550123",)) -> NewMessage:
    return NewMessage(new_message_id(time.time()), group, "critical", AlertStatus.FIRING,
                      SmsText(text, "GSM-7", 1), recipients, "send", 0)


# ---------------------------------------------------------------------------------------------
# Over HTTP


async def test_pages_need_admin_auth_and_browsers_are_asked_for_basic(start_receiver, http):
    rx = await start_receiver(admin_auth=ADMIN)
    for path in ("/ui", "/ui/", "/ui/groups", "/ui/export.csv", "/ui/messages/abc"):
        status, headers, text = await get(http, rx.url + path)
        # Basic, though bearer tokens are configured too: a browser prompts only for Basic
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith('Basic realm="sms-receiver admin"')
        assert headers["Content-Type"].startswith("text/html")
        assert "missing or wrong credentials" in text
    wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
    status, _, _ = await get(http, rx.url + "/ui/", headers={"Authorization": f"Basic {wrong}"})
    assert status == 401
    for auth in (BASIC, {"Authorization": f"Bearer {TOKEN}"}):
        status, headers, text = await get(http, rx.url + "/ui/", headers=auth)
        assert status == 200 and "Outbox backlog" in text
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "<script" not in text and "http://" not in text and "https://" not in text
        for secret in (PASSWORD, TOKEN, API_KEY):
            assert secret not in text
    status, headers, _ = await get(http, rx.url + "/ui", headers=BASIC)
    assert (status, headers["Location"]) == (302, "/ui/")


async def test_without_credentials_pages_answer_this_host_only(start_receiver, http):
    rx = await start_receiver()  # no admin_auth: loopback clients only, as /api/v1
    status, _, _ = await get(http, rx.url + "/ui/")
    assert status == 200
    status, headers, text = await get(http, rx.url + "/ui/", headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 403 and "admin_auth" in text and "WWW-Authenticate" not in headers


async def test_bad_filters_are_refused_naming_the_field(start_receiver, http):
    rx = await start_receiver()
    for query, named in (({"level": "loud"}, "level: 'loud' is not a level"),
                         ({"state": "gone"}, "state: 'gone' is not a state"),
                         ({"since": "last tuesday"}, "since: 'last tuesday' is not a time"),
                         ({"since": "1h", "until": "2h"}, "since: must be before until"),
                         ({"before": "x'--"}, "before: not a page cursor"),
                         ({"q": "x" * 201}, "q: the text to search for is longer than 200")):
        status, _, text = await get(http, rx.url + "/ui/", params=query)
        assert status == 400, query
        assert named in text.replace("&#39;", "'"), (query, text[-2000:])
        status, _, text = await get(http, rx.url + "/ui/export.csv", params=query)
        assert status == 400 and named in text
    status, _, text = await get(http, rx.url + "/ui/messages/0123456789abcdef")
    assert status == 404 and "no message" in text


async def test_filters_and_keyset_pages(start_receiver, http):
    rx = await start_receiver(run_dispatcher=False)
    store = rx.receiver.store
    base = time.time() - 3600
    # 60 in "db", 60 in "web" a second apart, and 30 in "db" all at one time (ties on created_at)
    for i in range(120):
        await store.accept([stored("db" if i % 2 else "web", f"alert {i} {'zebra' if i % 40 == 0 else ''}")],
                           base + i)
    await store.accept([stored("db", f"storm {i}") for i in range(30)], base + 200)

    async def walk(q: HistoryQuery) -> list[tuple[float, str]]:
        seen, pages = [], 0
        while True:
            page = await store.message_history(q)
            seen += [(m.created_at, m.id) for m in page.messages]
            pages += 1
            assert pages < 100
            if page.next is None:
                return seen
            q = HistoryQuery(**{**{f: getattr(q, f) for f in q.__slots__}, "before": page.next})

    everything = await walk(HistoryQuery(limit=50))
    assert len(everything) == 150 and everything == sorted(everything, reverse=True)
    assert len(set(everything)) == 150
    db = await walk(HistoryQuery(group="db", limit=7))
    assert len(db) == 90 and db == sorted(db, reverse=True)
    # a filter no index serves is checked on at most `scan` entries per page: still all found
    rare = await walk(HistoryQuery(text="ZEBRA", limit=50, scan=25))
    assert len(rare) == 3
    page = await store.message_history(HistoryQuery(text="zebra", limit=50, scan=25))
    assert page.scanned_to is not None and page.next is not None
    window = await walk(HistoryQuery(since=base + 10, until=base + 20, group="web"))
    assert len(window) == 5

    # the page: 50 rows and a link to the older ones, which shows the next 50
    status, _, text = await get(http, rx.url + "/ui/")
    assert status == 200 and len(listed(text)) == 50
    older = text.split('id="older" href="')[1].split('"')[0].replace("&amp;", "&")
    status, _, text2 = await get(http, rx.url + older)
    assert status == 200 and len(listed(text2)) == 50
    assert set(text.split("/ui/messages/")[1:51]).isdisjoint(text2.split("/ui/messages/")[1:51])
    status, _, text = await get(http, rx.url + "/ui/", params={"group": "web", "q": "alert 1"})
    shown = listed(text)
    assert status == 200 and shown and {g for g, _ in shown} == {"web"}
    assert all(t.startswith("alert 1") for _, t in shown), shown


async def test_csv_export_streams_every_row_and_defuses_formulas(start_receiver, http):
    rx = await start_receiver(run_dispatcher=False)
    dangerous = ['=HYPERLINK("http://evil.example","x")', "+1+2", "-2+3", "@SUM(A1:A2)", "\t=1+1"]
    await rx.receiver.store.accept([stored("web", t) for t in dangerous], time.time() - 10)
    await rx.receiver.store.accept([stored("db", f"bulk {i}") for i in range(1203)], time.time())
    async with http.get(f"{rx.url}/ui/export.csv") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert r.headers["Content-Disposition"].startswith('attachment; filename="sms-history-')
        assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed, not built whole
        body = await r.text()
    rows = list(csv.reader(io.StringIO(body)))
    assert tuple(rows[0]) == EXPORT_COLUMNS
    assert len(rows) == 1 + 5 + 1203
    text_at, number_at = EXPORT_COLUMNS.index("text"), EXPORT_COLUMNS.index("recipient")
    texts = {row[text_at] for row in rows[1:]}
    for t in dangerous:
        assert "'" + t in texts
    assert all(row[number_at] == "'+*******0123" for row in rows[1:])
    assert "+14155550123" not in body
    async with http.get(f"{rx.url}/ui/export.csv", params={"group": "web"}) as r:
        assert len(list(csv.reader(io.StringIO(await r.text())))) == 6


async def test_group_counts_follow_the_recipients(start_receiver):
    rx = await start_receiver(run_dispatcher=False)
    store, now = rx.receiver.store, time.time()
    await store.accept([stored("web", "a"), stored("web", "b", ("+14155550123", "+886911960999"))], now - 7200)
    assert [(c.group, c.by_state) for c in await store.group_counts(now - DAY)] == [("web", {"pending": 3})]
    for m in await store.claim(now, 10, 30):
        await store.finish(Result(m.id, tuple(RecipientUpdate(n, "failed", None, "105", "x")
                                              for n in m.pending_numbers), now, None, None))
    assert [(c.group, c.by_state) for c in await store.group_counts(now - DAY)] == [("web", {"failed": 3})]
    assert await store.group_counts(now - 600) == []  # whole hours: two hours ago is out
    assert await store.prune(now, 0, 0) >= 5
    assert await store.group_counts(now - DAY) == []


def test_csv_cell_and_meanings():
    assert [csv_cell(v) for v in ("=1", "+1", "-1", "@a", "a=1", 3, "", "\r=1")] == \
        ["'=1", "'+1", "'-1", "'@a", "a=1", 3, "", "'\r=1"]
    assert meaning("105") == "Invalid destination address"
    assert meaning("25", "one_api") == "Invalid recipient"
    assert meaning("100", "one_api") != meaning("100")  # One API's 100 is not REST's
    assert meaning("999") is None and meaning(None) is None


async def test_detail_and_groups_pages(start_receiver, fake, http):
    rx = await start_receiver(admin_auth=ADMIN)
    mid = await delivered_and_failed(http, fake, rx.url, BASIC)
    status, _, text = await get(http, f"{rx.url}/ui/messages/{mid}", headers=BASIC)
    assert status == 200
    assert 'class="recipient r-delivered"' in text and 'class="recipient r-failed"' in text
    assert "code 105: Invalid destination address" in text
    assert mask("+886911960999") in text and "+886911960999" not in text
    assert "DiskFull db-1" in text and "GSM-7" in text
    assert "alertname=DiskFull" in text and "instance=db-1:9100" in text  # the notification's labels
    status, _, text = await get(http, f"{rx.url}/ui/groups", headers=BASIC)
    assert status == 200 and "+*******0123" in text and "+14155550123" not in text
    assert '<svg' in text and 'aria-label="Last 24 h: sent 1, delivered 1, failed 1, held 0"' in text


# ---------------------------------------------------------------------------------------------
# In a browser


def _browser(tmp_path: Path) -> Any:
    """Headless chromium through chromedriver (Debian's packages), with a fresh profile."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are required in CI (.ci/run installs them)")
        pytest.skip("chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver as selenium
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("selenium is required in CI (pip install -e '.[test]')")
        pytest.skip("selenium is not installed (pip install selenium)")
    options = selenium.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = selenium.ChromeService(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    return selenium.Chrome(options=options, service=service)


def _shot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    # the whole page, not the first screenful
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    SHOTS.mkdir(exist_ok=True)
    shutil.copyfile(path, SHOTS / path.name)


def browse(url: str, tmp_path: Path, failed_mid: str) -> None:
    """What an on-call lead does: the list (behind auth), a filter, the failed page's detail,
    the groups, the CSV export; the console stays clean."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(tmp_path)
    try:
        driver.set_page_load_timeout(20)
        # no credentials: a 401 asking for Basic (the caller checks the log), which headless
        # chromium leaves unanswered, showing nothing
        driver.get(f"{url}/ui/")
        assert "Outbox backlog" not in driver.page_source
        driver.get_log("browser")  # read (and so cleared): that 401 was meant
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        # what answering the prompt does: the browser keeps the credentials for the later pages,
        # links and the download
        driver.get(url.replace("http://", f"http://{USER}:{PASSWORD}@") + "/ui/")
        groups = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#history tbody td:nth-child(2)")]
        assert sorted(set(groups)) == ["db", "web"], groups
        assert "Outbox backlog" in driver.find_element(By.CSS_SELECTOR, ".strip").text
        _shot(driver, tmp_path, "1-history")

        Select(driver.find_element(By.NAME, "group")).select_by_value("web")
        driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        WebDriverWait(driver, 10).until(lambda d: "group=web" in d.current_url)
        groups = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#history tbody td:nth-child(2)")]
        assert groups and set(groups) == {"web"}, groups
        _shot(driver, tmp_path, "2-filtered")

        driver.get(f"{url}/ui/?group=db")
        driver.find_element(By.CSS_SELECTOR, f"a[href='/ui/messages/{failed_mid}']").click()
        WebDriverWait(driver, 10).until(lambda d: failed_mid in d.current_url)
        delivered = driver.find_element(By.CSS_SELECTOR, "tr.r-delivered").text
        failed = driver.find_element(By.CSS_SELECTOR, "tr.r-failed").text
        assert "delivered" in delivered and "0999" in delivered
        assert "code 105: Invalid destination address" in failed and "0998" in failed
        _shot(driver, tmp_path, "3-detail")

        driver.get(f"{url}/ui/groups")
        assert "+*******0123" in driver.find_element(By.ID, "group-web").text
        _shot(driver, tmp_path, "4-groups")

        driver.get(f"{url}/ui/")
        driver.find_element(By.LINK_TEXT, "Export CSV").click()
        WebDriverWait(driver, 15).until(
            lambda d: [p for p in downloads.iterdir() if p.suffix == ".csv"])
        (csv_file,) = [p for p in downloads.iterdir() if p.suffix == ".csv"]
        rows = list(csv.reader(io.StringIO(csv_file.read_text())))
        assert tuple(rows[0]) == EXPORT_COLUMNS and len(rows) >= 4

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()


@pytest.mark.timeout(120)
async def test_in_a_browser(start_receiver, fake, http, tmp_path, caplog):
    _browser(tmp_path).quit()  # skipped (or, in CI, failed) here when there is no browser
    rx = await start_receiver(admin_auth=ADMIN)
    failed_mid = await delivered_and_failed(http, fake, rx.url, BASIC)
    await page_out(http, rx.url, alert("NodeDown", {"job": "node", "severity": "critical",
                                                     "instance": "web-3:9100"}), BASIC)
    # selenium blocks: it runs in a thread while this loop serves the pages it asks for
    await asyncio.to_thread(browse, rx.url, tmp_path, failed_mid)
    refused = [r.getMessage() for r in caplog.records if r.name == "sms_receiver.ui"]
    # the first visit, and the browser's first try of the URL with credentials (it sends them
    # once asked)
    assert refused and set(refused) == {"ui refused route=/ui/ status=401 reason='missing or wrong credentials'"}


async def test_detail_shows_acknowledgements(start_receiver, fake, http):
    groups = [{"id": "db", "name": "DB on-call", "level": "warning", "two_way": True,
               "members": ["+886911960999", "886911960998"]},
              {"id": "web", "level": "critical", "members": ["+14155550123"]},
              {"id": "info", "level": "info", "members": ["+4915112345678"]}]
    rx = await start_receiver(groups=groups)
    mid = await page_out(http, rx.url, alert("DiskFull", {"team": "db", "severity": "warning"}))

    async def sent() -> bool:
        return (await message(http, rx.url, mid))["state"] == "sent"

    await eventually(sent)
    async with http.post(f"{rx.url}/callbacks/clickatell/reply", json={
            "messageId": "x", "replyMessageId": "reply-1", "fromNumber": "886911960999",
            "toNumber": "27999000001", "text": "ACK", "timestamp": int(time.time() * 1000)}) as r:
        assert r.status == 200, await r.text()

    async def acked() -> bool:
        _, _, text = await get(http, f"{rx.url}/ui/messages/{mid}")
        return 'id="acks"' in text

    await eventually(acked)
    _, _, text = await get(http, f"{rx.url}/ui/messages/{mid}")
    assert "Acknowledgements and escalations" in text and "acknowledged 20" in text
    assert "alertname=DiskFull, severity=warning, team=db" in text
    assert "886911960999" not in text  # shown masked


async def test_status_strip(start_receiver, http):
    rx = await start_receiver(run_dispatcher=False)
    status, _, text = await get(http, rx.url + "/ui/groups")
    assert "Balance default: <b>not read yet</b>" in text and "Dry run: <b>off</b>" in text
    await rx.receiver.poll_balances_once()  # from the fake: 1267.92865 ZAR
    await rx.receiver.store.accept([stored("web", "a"), stored("db", "b")], time.time() - 90)
    _, _, text = await get(http, rx.url + "/ui/")
    assert "Balance default: <b>1,267.93 ZAR</b>" in text
    assert "Outbox backlog: <b>2</b>" in text and "Oldest pending: <b>1m3" in text
    assert "Last reload: <b>ok</b>" in text

    dry = await start_receiver(clickatell={"api_key": ""})
    _, _, text = await get(http, dry.url + "/ui/")
    assert "Dry run: no API key, nothing is sent" in text and "Balance" not in text
