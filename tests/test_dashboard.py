"""The dashboard (/admin/ui/) and the key holder's page (/meter/ui/) in a real browser.

Headless Chromium from Debian's packages, driven by Playwright for Python (never a downloaded browser), against
the real proxy and a real fake upstream on loopback; calls are made with the openai SDK. Every page the browser
opens is checked for requests that leave 127.0.0.1 and for console errors (a CSP violation is one). Screenshots
of every page are written to $METERPROXY_SCREENSHOTS when it is set (docs/screenshots/ holds the README's).

Without chromium the tests skip with the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import openai
import pytest

from proxy.limits import period_of
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.test_forwarding import request

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
USAGE = {"prompt_tokens": 1200, "completion_tokens": 345, "total_tokens": 1545}


def _have_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"chromium is not installed ({CHROMIUM}); `apt-get install -y chromium` (.ci/run does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


_missing = _have_browser()
if _missing and os.environ.get("CI") == "true":
    raise RuntimeError(f"browser tests cannot run under CI: {_missing}")
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


class Watched:
    """A page whose every request and console error is kept."""

    def __init__(self, page: Any) -> None:
        self.page, self.requests, self.errors, self.dialogs = page, [], [], []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def check(self) -> None:
        hosts = {urlsplit(u).hostname for u in self.requests if not u.startswith(("data:", "about:"))}
        assert hosts <= {"127.0.0.1"}, self.requests
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs  # a script that ran would have shown one


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[], Watched]]:
    contexts, pages = [], []

    def make() -> Watched:
        ctx = browser.new_context(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
        contexts.append(ctx)
        watched = Watched(ctx.new_page())
        pages.append(watched)
        return watched

    yield make
    for w in pages:
        w.check()
    for ctx in contexts:
        ctx.close()


def shot(page: Any, name: str) -> None:
    folder = os.environ.get("METERPROXY_SCREENSHOTS")
    data = page.screenshot(full_page=False)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(data)


def admin(proxy: ProxyServer, path: str) -> Any:
    status, _, raw = request(proxy.url, method="GET", path="/admin" + path, body=None,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, raw
    return json.loads(raw)


def sdk(proxy: ProxyServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def chat(upstream: FakeUpstream, client: openai.OpenAI, model: str, user: str | None = None, **usage: int) -> None:
    upstream.json({"id": "c", "object": "chat.completion", "created": 0, "model": model, "choices": [],
                   "usage": {**USAGE, **usage}})
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                   extra_headers={"X-Meter-User": user} if user else None)


def counted_stream(upstream: FakeUpstream, client: openai.OpenAI, user: str) -> None:
    chunk = {"id": "s", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"content": "Hello there"}, "finish_reason": None}]}
    upstream.sse(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
    for _ in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, extra_headers={"X-Meter-User": user}):
        pass


def log_in(w: Watched, proxy: ProxyServer, path: str = "/admin/ui/", field: str = "#token",
           secret: str = ADMIN_TOKEN) -> None:
    w.page.goto(proxy.url + path)
    assert w.page.url.endswith("/login")
    w.page.fill(field, secret)
    w.page.click("#login")
    w.page.wait_for_url(proxy.url + path)


def test_overview_equals_the_api_and_every_page_renders(proxy: ProxyServer, upstream: FakeUpstream,
                                                        open_page: Callable[[], Watched]) -> None:
    client = sdk(proxy, "sk-team-alpha-0001")
    chat(upstream, client, "gpt-4o", "alice")
    chat(upstream, client, "gpt-4o-mini", HOSTILE, prompt_tokens=77, completion_tokens=3, total_tokens=80)
    chat(upstream, sdk(proxy, "sk-team-beta-0002"), "mystery-model-x", "bob")  # unpriced
    counted_stream(upstream, client, "alice")
    client.close()

    w = open_page()
    page = w.page
    page.goto(proxy.url + "/admin/ui/")
    shot(page, "login")
    log_in(w, proxy)
    # The token is nowhere a page, a URL or browser storage could keep it.
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["meterproxy_admin"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict" and cookies[0]["expires"] > time.time()
    assert ADMIN_TOKEN not in cookies[0]["value"] and ADMIN_TOKEN not in page.content()
    assert page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == "{}{}"
    assert all(ADMIN_TOKEN not in u for u in w.requests)

    now = time.time()
    month = admin(proxy, f"/usage?since={period_of('month', now)[0]:.0f}")["totals"]
    today = admin(proxy, f"/usage?since={period_of('day', now)[0]:.0f}")["totals"]
    assert month["calls"] == 4 and month["unpriced_calls"] == 1 and month["counted_calls"] == 1
    assert page.get_attribute("#month-cost .usd", "title") == month["cost_usd"]  # exact, to the last digit
    assert page.get_attribute("#today-cost .usd", "title") == today["cost_usd"]
    assert page.inner_text("#month-calls") == str(month["calls"])
    assert page.inner_text("#month-errors") == str(month["errors"])
    assert page.inner_text("#counted-share") == f"{100 * month['counted_calls'] / month['calls']:.1f}%"
    assert "1 calls this month are unpriced" in page.inner_text("#unpriced")
    users = admin(proxy, f"/usage?group_by=user&since={period_of('month', now)[0]:.0f}")["rows"]
    top = page.inner_text("#top-user")
    assert HOSTILE in top  # shown as text: the script did not run (Watched.check: no dialog)
    assert page.locator("#top-user img").count() == 0
    assert [r["user"] for r in users] == [line.split("\t")[0] for line in top.splitlines()[1:]]

    page.click("text=user")  # the chart stacked by user
    assert page.url.endswith("?by=user")

    page.goto(proxy.url + "/admin/ui/usage?group_by=user,model")
    api = admin(proxy, "/usage?group_by=user,model")
    assert page.inner_text("#total-cost_usd") == api["totals"]["cost_usd"]
    assert page.locator("#usage-table tr").count() == len(api["rows"]) + 2  # header, rows, total
    with page.expect_download() as download:
        page.click("#csv")
    shown_csv = Path(download.value.path()).read_text()
    _, _, api_csv = request(proxy.url, method="GET", path="/admin/usage?group_by=user,model&format=csv", body=None,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert shown_csv == api_csv.decode()

    page.goto(proxy.url + "/admin/ui/calls?usage_source=counted")
    assert page.locator("#calls-table tr").count() == 2
    page.click("#calls-table a")
    assert "counted by the proxy with tiktoken" in page.inner_text("#why")
    assert "pricing_version" in page.inner_text("#call-fields")
    shot(page, "call")
    page.goto(proxy.url + "/admin/ui/calls")
    assert page.locator("#calls-table tr").count() == 5
    assert "unpriced" in page.inner_text("#calls-table")

    page.goto(proxy.url + "/admin/ui/pricing")
    assert page.inner_text("#pricing-version") == admin(proxy, "/pricing")["version"]
    assert "mystery-model-x" in page.inner_text("#unpriced-table")
    shot(page, "pricing")
    page.goto(proxy.url + "/admin/ui/accuracy")
    shot(page, "accuracy")

    page.click("text=Log out")
    page.wait_for_url(proxy.url + "/admin/ui/login")
    page.goto(proxy.url + "/admin/ui/")
    assert page.url.endswith("/admin/ui/login")


def test_a_key_created_in_the_ui_works_and_is_refused_once_revoked(start_proxy: Callable[..., ProxyServer],
                                                                   upstream: FakeUpstream,
                                                                   open_page: Callable[[], Watched]) -> None:
    proxy = start_proxy(keys="managed", upstream_api_key="sk-real-upstream")
    w = open_page()
    page = w.page
    log_in(w, proxy)
    page.click("text=Keys")
    page.fill("#create-key input[name=user]", HOSTILE)
    page.fill("#create-key input[name=team]", "ml")
    page.fill("#create-key input[name=budget_usd]", "0.5")
    page.click("#create-key button")
    key = page.inner_text("#new-key-value")
    assert key.startswith("mp-") or len(key) > 20
    page.goto(proxy.url + "/admin/ui/keys")
    assert key not in page.content()  # shown once only

    client = sdk(proxy, key)
    chat(upstream, client, "gpt-4o")
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sk-real-upstream"
    (row,) = admin(proxy, "/keys")["keys"]
    page.reload()
    assert page.get_attribute(f"#key-{row['key_id']} .usd", "title") == row["spent_usd"]
    assert HOSTILE in page.inner_text("#keys-table")
    page.click("text=Create a key")
    shot(page, "keys")
    row_form = f"#key-{row['key_id']} form:not(:has(.revoke))"
    page.fill(f"{row_form} input[name=budget_usd]", "0.75")
    page.fill(f"{row_form} input[name=rpm]", "12")
    page.click(f"{row_form} button")
    page.wait_for_url(proxy.url + "/admin/ui/keys")
    (changed,) = admin(proxy, "/keys")["keys"]
    assert (changed["budget_usd"], changed["rpm"]) == ("0.75", 12)
    assert page.get_attribute(f"#key-{row['key_id']} td:nth-child(7) .usd", "title") == changed["left_usd"]

    page.goto(proxy.url + "/admin/ui/budgets")
    page.select_option("#set-budget select[name=kind]", "team")
    page.fill("#set-budget input[name=name]", "ml")
    page.fill("#set-budget input[name=budget_usd]", "0.005")
    page.click("#set-budget button")
    page.wait_for_url(proxy.url + "/admin/ui/budgets")
    (budget,) = admin(proxy, "/budgets")["budgets"]
    assert budget["budget_usd"] == "0.005" and page.get_attribute("#budgets-table td.n .usd", "title") == \
        budget["spent_usd"]
    page.goto(proxy.url + "/admin/ui/")
    assert "team ml" in page.inner_text("#near")  # spent passes 80% of its budget
    page.goto(proxy.url + "/admin/ui/budgets")
    page.click("#budgets-table button.danger")
    page.wait_for_url(proxy.url + "/admin/ui/budgets")
    assert admin(proxy, "/budgets")["budgets"] == [] and "no budgets" in page.inner_text("#budgets-table")

    page.goto(proxy.url + "/admin/ui/keys")
    page.click(f"#key-{row['key_id']} button.revoke")
    page.wait_for_url(proxy.url + "/admin/ui/keys")
    assert page.inner_text(f"#key-{row['key_id']} .status") == "revoked"
    with pytest.raises(openai.AuthenticationError):
        chat(upstream, client, "gpt-4o")
    client.close()


def test_a_key_holder_sees_only_their_own_key(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                              open_page: Callable[[], Watched]) -> None:
    proxy = start_proxy(keys="managed", upstream_api_key="sk-real-upstream")
    made = []
    for user in ("carol", "dave"):
        status, _, raw = request(proxy.url, path="/admin/keys", body=json.dumps(
            {"user": user, "budget_usd": "2", "budget_period": "month"}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 201
        made.append(json.loads(raw))
    mine, theirs = made
    for created, model in ((mine, "gpt-4o"), (theirs, "gpt-4o-mini"), (theirs, "gpt-4o")):
        client = sdk(proxy, created["key"])
        chat(upstream, client, model)
        client.close()

    w = open_page()
    page = w.page
    log_in(w, proxy, "/meter/ui/", "#key", mine["key"])
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and mine["key"] not in cookie["value"]
    assert mine["key"] not in page.content()
    status, _, raw = request(proxy.url, method="GET", path="/meter/usage", body=None,
                             headers={"Authorization": f"Bearer {mine['key']}"})
    own = json.loads(raw)
    assert page.inner_text("#key-id") == mine["key_id"]
    assert page.get_attribute("#spent .usd", "title") == own["totals"]["cost_usd"]
    assert page.get_attribute(".budget-left .usd", "title") == own["budgets"][0]["left_usd"]
    text = page.content()
    assert theirs["key_id"] not in text and "dave" not in text and "gpt-4o-mini" not in text
    shot(page, "meter")
    # The admin pages are not a key holder's: their session does not open them.
    page.goto(proxy.url + "/admin/ui/")
    assert page.url.endswith("/admin/ui/login")

    request(proxy.url, method="DELETE", path=f"/admin/keys/{mine['key_id']}", body=None,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert page.goto(proxy.url + "/meter/ui/").status == 401
    assert "no longer active" in page.inner_text("#error")
    # The browser logs the 401 it was just shown: that one error is expected, any other is not.
    assert w.errors == ["console error: Failed to load resource: the server responded with a status of 401 "
                        "(Unauthorized)"]
    w.errors.clear()
    page.goto(proxy.url + "/meter/ui/")
    assert page.url.endswith("/meter/ui/login")  # the ended session is gone


def _seed(db: str, days: int, per_day: int) -> None:
    """A month of varied calls (60 keys in 12 teams, 400 users, 14 models; bench.report_scale's generator)
    for the `days` whole UTC days before today, written with their rollups as the proxy's writer does."""
    import random
    import sqlite3

    from bench.report_scale import _rows, _World
    from proxy import rollups
    from proxy.ledger_db import INSERT_SQL
    from proxy.migrations import migrate

    rng = random.Random(7)
    world = _World(rng)
    today = int(period_of("day", time.time())[0])
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        migrate(conn)
        for d in range(days, 0, -1):
            rows = _rows(world, rng, per_day, (days - d) * per_day, today - d * 86400)
            conn.execute("BEGIN")
            conn.executemany(INSERT_SQL, rows)
            rollups.apply(conn, rows)
            conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_busy_month_equals_the_api(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                     open_page: Callable[[], Watched], tmp_path: Path) -> None:
    db = str(tmp_path / "busy.db")
    _seed(db, 29, 120)
    proxy = start_proxy(db=db)
    client = sdk(proxy, "sk-today-0003")
    chat(upstream, client, "gpt-4o", "alice")
    client.close()
    now = time.time()
    since = f"{period_of('month', now)[0]:.0f}"
    teams = admin(proxy, f"/usage?group_by=tag:team&since={period_of('day', now)[0] - 29 * 86400:.0f}")["rows"]
    spent = teams[0]["cost_usd"]
    status, _, raw = request(proxy.url, method="PUT", path=f"/admin/budgets/team/{teams[0]['tag:team']}",
                             body=json.dumps({"budget_usd": str(round(float(spent) * 1.1, 2) + 0.01),
                                              "budget_period": "total"}).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, raw

    w = open_page()
    page = w.page
    log_in(w, proxy)
    month = admin(proxy, f"/usage?since={since}")["totals"]
    assert page.get_attribute("#month-cost .usd", "title") == month["cost_usd"]
    assert page.inner_text("#month-calls") == f"{month['calls']:,}"
    assert page.get_attribute("meta[http-equiv=refresh]", "content") == "30"  # it reloads itself while open
    assert page.inner_text("#counted-calls") == f"{month['counted_calls']:,}"
    for label, field in (("model", "model"), ("key", "key"), ("user", "user"), ("team", "tag:team")):
        rows = admin(proxy, f"/usage?group_by={field}&since={since}")["rows"][:5]
        shown = page.locator(f"#top-{label} .usd").evaluate_all("els => els.map(e => e.title)")
        assert shown == [r["cost_usd"] for r in rows], label
    # 30 days of columns; each day's stack totals the API's figure for that day.
    trend = admin(proxy, f"/usage?group_by=day&since={period_of('day', now)[0] - 29 * 86400:.0f}")["rows"]
    titles = page.locator("svg.chart rect[pointer-events=none] title").all_text_contents()
    assert len(titles) == 30
    by_day = {t.split(" total: ")[0]: t.split(" total: ")[1].removesuffix(" USD") for t in titles}
    assert {r["day"]: r["cost_usd"] for r in trend} == {d: v for d, v in by_day.items() if v != "0"}
    assert f"team {teams[0]['tag:team']}" in page.inner_text("#near")
    shot(page, "overview")
    page.click("h2 >> text=user")  # stacked by user: the top users' own days, the rest as "other"
    assert page.url.endswith("?by=user")
    titles = page.locator("svg.chart rect[pointer-events=none] title").all_text_contents()
    assert {t.split(" total: ")[0]: t.split(" total: ")[1].removesuffix(" USD") for t in titles} == by_day
    top_user = admin(proxy, f"/usage?group_by=user&since={period_of('day', now)[0] - 29 * 86400:.0f}")["rows"][0]
    days = admin(proxy, f"/usage?group_by=day&user={top_user['user']}&since={period_of('day', now)[0] - 29 * 86400:.0f}")
    bars = page.locator("svg.chart rect:not([pointer-events]) title").all_text_contents()
    mine = {b.split(" ")[0]: b.split(": ")[1].removesuffix(" USD") for b in bars if f" {top_user['user']}: " in b}
    assert mine == {r["day"]: r["cost_usd"] for r in days["rows"]}
    assert any(" other (" in b for b in bars)
    page.goto(proxy.url + "/admin/ui/usage?group_by=tag:team,model&since=" + since)
    assert page.inner_text("#total-cost_usd") == admin(proxy, f"/usage?group_by=tag:team,model&since={since}")[
        "totals"]["cost_usd"]
    shot(page, "usage")
    page.goto(proxy.url + "/admin/ui/budgets")
    shot(page, "budgets")
    page.goto(proxy.url + "/admin/ui/calls")
    shot(page, "calls")
    first = page.locator("#calls-table a").first.inner_text()
    assert page.locator("#calls-table tr").count() == 51  # 50 a page, newest first
    page.click("#older")
    assert "before=" in page.url and page.locator("#calls-table a").first.inner_text() <= first
    newest = admin(proxy, "/calls?limit=50")
    assert page.locator("#calls-table a").first.get_attribute("href").endswith(
        admin(proxy, f"/calls?limit=1&before={newest['next']}")["calls"][0]["request_id"])
