"""The dashboard in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by selenium)
against a real API (auth required, ``GATEWAY_ADMIN_KEY`` set), real workers and the fake upstream: log in,
watch a provider's line fill and drain while load runs, create and revoke a key, stream a playground
answer, download the usage CSV, filter the requests. A screenshot of every page goes to the run's tmp
dir (its path is printed; ``pytest -s`` shows it).

The session cookie's properties and the login's refusals are checked over plain HTTP first.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import Api, WorkerFactory, wait_until

pytestmark = pytest.mark.integration

ADMIN_SECRET = "dashboard-admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def dash_env(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_ADMIN_KEY": ADMIN_SECRET,
            "GATEWAY_STATE_DIR": str(tmp_path_factory.mktemp("dash-state"))}


@pytest.fixture(scope="module")
def server(dash_env: dict[str, str], workers: list[Any], worker_factory: WorkerFactory,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    limited = worker_factory.start("limited")   # concurrency 2: a burst waits in its line
    api = Api(dash_env, tmp_path_factory.mktemp("dash-api") / "api.log").start()
    try:
        yield api
    finally:
        api.kill()
        limited.stop()


@pytest.fixture(scope="module")
def client_key(server: Api) -> dict[str, Any]:
    r = requests.post(f"{server.url}/admin/keys", json={"name": "load"}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\ndashboard screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard-downloads")


@pytest.fixture(scope="module")
def browser(server: Api, downloads: Path) -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: Any, shots: Path, name: str) -> None:
    """A screenshot of the whole page, below the fold too (Chromium's DevTools capture)."""
    import base64

    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 5000), "scale": 1}})
    (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def chat(url: str, secret: str, content: str = "hello there", model: str = "limited-model") -> int:
    r = requests.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": model, "messages": [{"role": "user", "content": content}]}, timeout=60)
    return r.status_code


# over plain HTTP -----------------------------------------------------------------------------------
def test_pages_need_a_session_and_the_cookie_is_strict(server: Api, client_key: dict[str, Any]) -> None:
    r = requests.get(f"{server.url}/dashboard/keys", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and "/dashboard/login" in r.headers["Location"]
    assert requests.get(f"{server.url}/dashboard/queues/live", timeout=10).status_code == 401

    wrong = requests.post(f"{server.url}/dashboard/login", data={"key": "nope"}, allow_redirects=False,
                          timeout=10)
    assert wrong.status_code == 401 and "invalid" in wrong.text and "Set-Cookie" not in wrong.headers
    client = requests.post(f"{server.url}/dashboard/login", data={"key": client_key["secret"]},
                           allow_redirects=False, timeout=10)
    assert client.status_code == 403 and "admin role" in client.text

    ok = requests.post(f"{server.url}/dashboard/login", data={"key": ADMIN_SECRET, "next": "//evil.example/"},
                       allow_redirects=False, timeout=10)
    assert ok.status_code == 302 and ok.headers["Location"].endswith("/dashboard/")  # no open redirect
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert ADMIN_SECRET not in cookie
    session = requests.Session()
    session.cookies.update(ok.cookies)
    assert session.get(f"{server.url}/dashboard/keys", timeout=10).status_code == 200
    # a form post from another site is refused even with the cookie
    foreign = session.post(f"{server.url}/dashboard/keys", data={"name": "x"},
                           headers={"Origin": "http://evil.example"}, timeout=10)
    assert foreign.status_code == 403
    forged = requests.get(f"{server.url}/dashboard/keys", cookies={"gw_dashboard": cookie.split(";")[0]
                          .split("=", 1)[1][:-2] + "xx"}, allow_redirects=False, timeout=10)
    assert forged.status_code == 302


def login(url: str, secret: str) -> requests.Session:
    session = requests.Session()
    r = session.post(f"{url}/dashboard/login", data={"key": secret}, allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    return session


def test_an_admin_role_key_session_ends_when_the_key_is_revoked(server: Api) -> None:
    key = requests.post(f"{server.url}/admin/keys", json={"name": "ops", "role": "admin"}, headers=ADMIN,
                        timeout=10).json()
    session = login(server.url, key["secret"])
    page = session.get(f"{server.url}/dashboard/keys", timeout=10)
    assert page.status_code == 200 and key["id"] in page.text   # the header names who is logged in
    requests.delete(f"{server.url}/admin/keys/{key['id']}", headers=ADMIN, timeout=10).raise_for_status()
    after = session.get(f"{server.url}/dashboard/keys", allow_redirects=False, timeout=10)
    assert after.status_code == 302 and "/dashboard/login" in after.headers["Location"]


@pytest.mark.parametrize(("query", "shown"), [
    ("from=2026-13-01", "'from' is not a valid time (month must be in 1..12)"),
    ("from=2026-11-02&to=2026-11-01", "'to' (2026-11-01T00:00:00Z) must be after 'from'"),
    ("group_by=week", "group by one of"),
], ids=["bad-date", "backwards", "unknown-grouping"])
def test_bad_usage_parameters_are_explained_not_500(server: Api, query: str, shown: str) -> None:
    session = login(server.url, ADMIN_SECRET)
    page = session.get(f"{server.url}/dashboard/usage?{query}", timeout=10)
    assert page.status_code == 200 and shown in page.text.replace("&#39;", "'"), page.text[:2000]
    csv = session.get(f"{server.url}/dashboard/usage.csv?{query}", timeout=10)
    assert csv.status_code == 400 and shown in csv.text


# in Chromium -----------------------------------------------------------------------------------------
def test_login_and_overview(browser: Any, server: Api, client_key: dict[str, Any], shots: Path) -> None:
    from selenium.webdriver.common.by import By

    budget = requests.post(f"{server.url}/admin/budgets", headers=ADMIN, timeout=10, json={
        "name": "load-monthly", "scope": "key", "key_id": client_key["id"], "period": "monthly",
        "limit_usd": "5"})
    assert budget.status_code == 201, budget.text
    for n in range(3):
        assert chat(server.url, client_key["secret"], f"warm up {n}", model="fake-model") == 200
    browser.get(f"{server.url}/dashboard/")
    assert "/dashboard/login" in browser.current_url
    shoot(browser, shots, "00-login")
    browser.find_element(By.ID, "key").send_keys(ADMIN_SECRET)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(lambda: browser.title.startswith("Overview"), 10)
    tiles = browser.find_element(By.CSS_SELECTOR, ".tiles").text
    assert "requests/s" in tiles and "spent today" in tiles
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    budgets = browser.find_element(By.ID, "budgets").text   # the key's budget, spent of its limit
    assert "load-monthly · load · monthly" in budgets and "/ $5.00" in budgets
    shoot(browser, shots, "01-overview")
    browser.get(f"{server.url}/dashboard/?window=day")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    shoot(browser, shots, "01-overview-day")


def test_queue_fills_and_drains_while_load_runs(browser: Any, server: Api, fake: Any,
                                                 client_key: dict[str, Any], shots: Path) -> None:
    from selenium.webdriver.common.by import By

    fake.configure(latency_ms=400)
    browser.get(f"{server.url}/dashboard/queues")
    card = "section.provider[data-provider=limited]"

    def waiting() -> int:
        # the live part is replaced every 2 s: read it afresh each time
        try:
            box = browser.find_element(By.CSS_SELECTOR, card)
            return sum(int(box.find_element(By.CSS_SELECTOR, sel).text) for sel in (".in-line", ".in-broker"))
        except Exception:  # replaced between the two reads: read again next time
            return -1

    assert waiting() == 0
    results: list[int] = []
    threads = [threading.Thread(target=lambda n=n: results.append(chat(server.url, client_key["secret"],
                                                                        f"load {n}"))) for n in range(16)]
    for thread in threads:
        thread.start()
    wait_until(lambda: waiting() >= 4, 15)  # 16 calls, 2 at a time, 0.4 s each: ~3 s of queue
    box = browser.find_element(By.CSS_SELECTOR, card)
    who = box.find_element(By.CSS_SELECTOR, f"table a[title={client_key['id']}]")  # who is waiting, by key
    assert who.text == "load"
    assert "concurrency" in box.text                  # the limit that holds them, as a gauge
    assert "breaker closed" in box.text                # routing's breaker for its deployment
    shoot(browser, shots, "02-queues-busy")
    for thread in threads:
        thread.join(60)
    assert results == [200] * 16
    wait_until(lambda: waiting() == 0, 10)
    shoot(browser, shots, "02-queues-drained")


def test_create_use_and_revoke_a_key(browser: Any, server: Api, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{server.url}/dashboard/keys")
    if not browser.find_element(By.ID, "create").get_attribute("open"):
        browser.find_element(By.CSS_SELECTOR, "#create summary").click()
    form = browser.find_element(By.CSS_SELECTOR, "#create form")
    form.find_element(By.NAME, "name").send_keys("from the dashboard")
    Select(form.find_element(By.NAME, "role")).select_by_visible_text("client")
    form.find_element(By.NAME, "allowed_models").send_keys("fake-model, limited-*")
    form.find_element(By.NAME, "limit_rpm").send_keys("600")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    secret = browser.find_element(By.ID, "new-secret").text
    assert secret.startswith("sk-gw-")
    shoot(browser, shots, "03-keys-created")
    assert chat(server.url, secret, model="fake-model") == 200
    assert chat(server.url, secret, model="metered-model") == 403   # its allowed models hold

    browser.get(f"{server.url}/dashboard/keys")
    assert "shown only this once" not in browser.page_source  # the secret is not shown again
    row = browser.find_element(By.XPATH, "//tr[td[contains(., 'from the dashboard')]]")
    key_id = row.get_attribute("data-key")
    assert "rpm 600" in row.text and "fake-model, limited-*" in row.text
    row.find_element(By.LINK_TEXT, "Edit").click()
    limit = browser.find_element(By.NAME, "limit_rpm")
    limit.clear()
    limit.send_keys("1200")
    browser.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
    assert "Saved" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert requests.get(f"{server.url}/admin/keys/{key_id}", headers=ADMIN, timeout=10).json()["limits"] == {
        "rpm": 1200}

    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-key={key_id}]")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    browser.switch_to.alert.accept()   # "Revoke …? This cannot be undone."
    wait_until(lambda: "Revoked" in browser.page_source, 10)
    assert "revoked" in browser.find_element(By.CSS_SELECTOR, f"tr[data-key={key_id}] td.status").text
    shoot(browser, shots, "03-keys-revoked")
    wait_until(lambda: chat(server.url, secret, model="fake-model") == 401, 5)


def test_playground_streams_an_answer(browser: Any, server: Api, fake: Any, client_key: dict[str, Any],
                                      shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    fake.configure(chunk_delay_ms=120)
    browser.get(f"{server.url}/dashboard/playground")
    Select(browser.find_element(By.ID, "pg-model")).select_by_visible_text("fake-model")
    browser.find_element(By.ID, "pg-key").send_keys(client_key["secret"])
    prompt = browser.find_element(By.ID, "pg-prompt")
    prompt.clear()
    prompt.send_keys("one two three four five six seven eight")
    browser.find_element(By.ID, "pg-send").click()
    answer = browser.find_element(By.ID, "pg-answer")
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while answer.get_attribute("data-done") != "1" and time.monotonic() < deadline:
        seen.add(answer.text)
        time.sleep(0.05)
    assert answer.text == "echo: one two three four five six seven eight"
    partial = {text for text in seen if text and text != answer.text}
    assert len(partial) >= 2, seen   # it arrived word by word, not all at once
    assert browser.find_element(By.ID, "t-status").text == "200"
    assert browser.find_element(By.ID, "t-first").text.endswith(("ms", " s"))
    assert browser.find_element(By.ID, "t-served").text.startswith("fake")
    shoot(browser, shots, "05-playground")


def test_usage_csv_download_matches_the_admin_api(browser: Any, server: Api, downloads: Path,
                                                  shots: Path) -> None:
    from selenium.webdriver.common.by import By

    # the usage rows reach Postgres through the ledger: wait until the load's calls are all counted
    def counted() -> int:
        body = requests.get(f"{server.url}/admin/usage", headers=ADMIN, timeout=10).json()
        return int(body["total"]["requests"])

    wait_until(lambda: counted() >= 16 + 3 + 2, 15)
    browser.get(f"{server.url}/dashboard/usage?group_by=day,key")
    assert browser.find_elements(By.CSS_SELECTOR, "#usage-table tbody tr")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 2
    shoot(browser, shots, "04-usage")
    browser.find_element(By.ID, "csv").click()
    wait_until(lambda: [p for p in downloads.glob("usage_*.csv")], 10)
    got = next(downloads.glob("usage_*.csv")).read_bytes()
    expected = requests.get(f"{server.url}/admin/usage.csv", params={"group_by": "day,key"}, headers=ADMIN,
                            timeout=10).content
    assert got == expected and got.startswith(b"day,key,requests")


def test_requests_filter_and_job_timeline(browser: Any, server: Api, client_key: dict[str, Any],
                                          shots: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/dashboard/requests?key={client_key['id']}&model=limited-model")
    rows = browser.find_elements(By.CSS_SELECTOR, "#calls tbody tr:not(.errline)")
    assert len(rows) == 16, [r.text for r in rows]
    assert all("limited-model" in r.text and "ok" in r.text for r in rows)
    shoot(browser, shots, "06-requests")
    rows[0].find_element(By.CSS_SELECTOR, "td a").click()
    wait_until(lambda: browser.title.startswith("Job"), 10)
    assert "Live state" in browser.page_source and "succeeded" in browser.page_source
    shoot(browser, shots, "07-job")
    browser.get(f"{server.url}/dashboard/requests?status=error")
    assert "No calls match" in browser.page_source
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait_until(lambda: "/dashboard/login" in browser.current_url, 10)
    browser.get(f"{server.url}/dashboard/requests")
    assert "/dashboard/login" in browser.current_url
