"""The page at ``/`` and its client (``app/static/sluice.js``) in a real browser.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``; ``.ci/run``
installs them) driven by Selenium, against real front ends, workers and the
mock model.  A browser that cannot start fails the test with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from app.cli.dev.redis_server import free_port
from tasks.admission import Admission
from tasks.config import Settings
from tests.conftest import MOCK, Proc, start_mock, start_web_on, start_worker, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FAST = MockConfig(**MOCK)  # the session's mock
#: A mock slow enough to watch answers stream side by side and to drop a socket mid-answer.
SLOW = {"ttft_ms": 100, "itl_ms": 40, "output_tokens": 100}
#: Set to a path to keep a copy of the page's screenshot there (the notes of a dev session).
SCREENSHOT_COPY = os.environ.get("SLUICE_SCREENSHOT_COPY", "")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium (or Firefox, see below); fails (never skips) when it cannot start."""
    if os.environ.get("SLUICE_BROWSER") == "firefox":
        yield from firefox()
        return
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}: "
                    "apt-get install -y chromium chromium-driver (.ci/run does)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--lang=en-US"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)
    except Exception as e:  # noqa: BLE001 - any reason is the test's failure
        pytest.fail(f"headless Chromium did not start: {e}")
    yield driver
    driver.quit()


def firefox() -> Iterator[WebDriver]:
    """Headless Firefox, for a check by hand: ``SLUICE_BROWSER=firefox
    SLUICE_GECKODRIVER=/path/to/geckodriver`` (Debian packages no geckodriver)."""
    options = webdriver.FirefoxOptions()
    options.add_argument("-headless")
    options.add_argument("--width=1280")
    options.add_argument("--height=1000")
    try:
        driver = webdriver.Firefox(options=options, service=webdriver.FirefoxService(
            executable_path=os.environ.get("SLUICE_GECKODRIVER", "geckodriver")))
    except Exception as e:  # noqa: BLE001 - any reason is the test's failure
        pytest.fail(f"headless Firefox did not start: {e}")
    yield driver
    driver.quit()


def http_base(ws_url: str) -> str:
    """``ws://host:port/ws`` -> ``http://host:port``."""
    return "http" + ws_url.removeprefix("ws").removesuffix("/ws")


@pytest.fixture(scope="module")
def slow_env(start_proc: Callable[..., Proc], sluice_env: dict[str, str]
             ) -> Iterator[dict[str, str]]:
    """A slow mock and a worker of its own, on a queue of their own; stopped with the module."""
    mock, url = start_mock(start_proc, **SLOW)
    env = {**sluice_env, "OPENAI_BASE_URL": url, "SLUICE_QUEUE": "browser-slow",
           "SLUICE_METRICS_PORT": "0", "SLUICE_WORKER_CONCURRENCY": "20"}
    worker = start_worker(start_proc, env, name="slow")
    yield env
    worker.stop()
    mock.stop()


@pytest.fixture(scope="module")
def slow_web(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> str:
    """A front end of the slow stack: the base URL of its page."""
    port = free_port()
    start_web_on(start_proc, slow_env, port)
    return f"http://127.0.0.1:{port}"


class Page:
    """The page in the browser, read and driven the way a person would."""

    def __init__(self, driver: WebDriver, base: str) -> None:
        self.driver = driver
        self.base = base

    def open(self, key: str) -> Page:
        """Load the page and connect with ``key``."""
        self.driver.get(self.base + "/")
        self.driver.execute_script("sessionStorage.clear()")
        box = self.driver.find_element(By.ID, "key")
        box.clear()
        box.send_keys(key, Keys.ENTER)
        return self

    def connected(self) -> Page:
        self.wait_state("open")
        return self

    def state(self) -> str:
        return str(self.js("return document.getElementById('conn').dataset.state"))

    def wait_state(self, state: str, timeout_s: float = 20) -> None:
        wait_for(lambda: self.state() == state, timeout_s, f"connection state {state!r}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def set_value(self, element_id: str, value: str) -> None:
        self.js("document.getElementById(arguments[0]).value = arguments[1]", element_id, value)

    def ask(self, prompt: str) -> None:
        """Type a prompt into the chat box and press Enter."""
        self.driver.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)

    def answers(self) -> list[dict[str, Any]]:
        """Every chat answer: state, text, token frames, meta line."""
        return list(self.js("""
            return [...document.querySelectorAll('#transcript .answer')].map(a => ({
              state: a.dataset.state, tokens: +a.dataset.tokens, jobId: a.dataset.jobId,
              text: a.querySelector('.answer-text').textContent,
              meta: a.querySelector('.meta').textContent}));"""))

    def wait_answers(self, n: int, state: str, timeout_s: float = 30) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            found = self.answers()
            return found if len(found) == n and all(a["state"] == state for a in found) else None
        return wait_for(ready, timeout_s, f"{n} answers {state!r}")  # type: ignore[no-any-return]

    def screenshot(self, path: Path) -> None:
        """Save a PNG of the page, and a copy where ``SLUICE_SCREENSHOT_COPY`` says."""
        self.driver.save_screenshot(str(path))
        if SCREENSHOT_COPY:
            shutil.copyfile(path, SCREENSHOT_COPY)


def test_an_answer_streams_into_its_bubble_as_the_mock_wrote_it(
        browser: WebDriver, web: str, api_key: str) -> None:
    """One prompt: its bubble grows token by token and ends with the mock's exact text and timings."""
    page = Page(browser, http_base(web)).open(api_key).connected()
    page.set_value("max-tokens", "8")
    # Record every length the answer's text had on screen.
    page.js("""
        window.seenLengths = new Set();
        new MutationObserver(() => {
          for (const t of document.querySelectorAll('#transcript .answer-text'))
            window.seenLengths.add(t.textContent.length);
        }).observe(document.getElementById('transcript'),
                   {subtree: true, childList: true, characterData: true});""")
    page.ask("hello from the browser")
    [answer] = page.wait_answers(1, "done")
    assert answer["text"] == expected_text("hello from the browser", 8, FAST)
    seen = page.js("return [...window.seenLengths]")
    partial = [n for n in seen if 0 < n < len(answer["text"])]
    assert len(partial) >= 2, f"the text appeared all at once: lengths seen {sorted(seen)}"
    assert "TTFT" in answer["meta"] and "TPOT" in answer["meta"] and "8 tokens" in answer["meta"]
    assert "server: queue" in answer["meta"], answer["meta"]


def test_three_prompts_stream_side_by_side(browser: WebDriver, slow_web: str,
                                           api_key: str) -> None:
    """Three prompts sent one after another: three bubbles stream at the same time, each right."""
    page = Page(browser, slow_web).open(api_key).connected()
    page.set_value("max-tokens", "30")
    prompts = ["first of three", "second of three", "third of three"]
    for p in prompts:
        page.ask(p)  # the box never locks

    def all_streaming() -> bool:
        return [a["state"] for a in page.answers()] == ["streaming"] * 3
    wait_for(all_streaming, 20, "three answers streaming at once")
    answers = page.wait_answers(3, "done")
    for p, a in zip(prompts, answers, strict=True):
        assert a["text"] == expected_text(p, 30, MockConfig(**SLOW))


def test_the_cancel_button_stops_its_answer(browser: WebDriver, slow_web: str,
                                            api_key: str) -> None:
    """Cancel on one of two streaming answers: that one stops short, the other completes."""
    page = Page(browser, slow_web).open(api_key).connected()
    page.set_value("max-tokens", "30")
    page.ask("keep going")
    # The one to cancel is long (4 s): a slow box must not see it end before the click.
    page.set_value("max-tokens", "100")
    page.ask("stop me")
    wait_for(lambda: all(a["tokens"] >= 2 for a in page.answers()), 20, "both answers streaming")
    page.driver.find_elements(By.CSS_SELECTOR, "#transcript .answer .cancel")[1].click()
    wait_for(lambda: [a["state"] for a in page.answers()] == ["done", "cancelled"], 20,
             "one answer done, the other cancelled")
    kept, stopped = page.answers()
    assert kept["text"] == expected_text("keep going", 30, MockConfig(**SLOW))
    whole = expected_text("stop me", 100, MockConfig(**SLOW))
    assert whole.startswith(stopped["text"])
    assert len(stopped["text"]) < len(whole)
    assert "Cancelled." in stopped["meta"]


def test_an_answer_completes_without_a_gap_across_a_front_end_restart(
        browser: WebDriver, start_proc: Callable[..., Proc], slow_env: dict[str, str],
        api_key: str) -> None:
    """The front end dies mid-answer and comes back: the page reconnects, resumes, and the text is whole."""
    port = free_port()
    web = start_web_on(start_proc, slow_env, port)
    page = Page(browser, f"http://127.0.0.1:{port}").open(api_key).connected()
    page.ask("survive the restart")
    wait_for(lambda: page.answers()[0]["tokens"] >= 5, 20, "a few tokens before the kill")
    web.kill(signal.SIGKILL)
    page.wait_state("reconnecting")
    notice = page.js("return document.getElementById('notice-text').textContent")
    assert "Connection lost" in notice and "resume" in notice, notice
    tokens_at_kill = page.answers()[0]["tokens"]
    assert tokens_at_kill < SLOW["output_tokens"], "the answer ended before the kill"
    start_web_on(start_proc, slow_env, port)
    page.wait_state("open")
    [answer] = page.wait_answers(1, "done")
    assert answer["text"] == expected_text("survive the restart", None, MockConfig(**SLOW))


def test_bulk_of_five_lines_completes(browser: WebDriver, web: str, api_key: str,
                                      tmp_path: Path) -> None:
    """Five lines pasted into Bulk: five cells stream, the count reaches 5 / 5, each text is right."""
    page = Page(browser, http_base(web)).open(api_key).connected()
    page.ask("a chat answer beside the bulk run")
    lines = [f"bulk line {i}" for i in range(1, 6)]
    page.set_value("bulk-max-tokens", "6")
    page.driver.find_element(By.ID, "bulk-prompts").send_keys("\n".join(lines))
    page.driver.find_element(By.ID, "bulk-run").click()
    wait_for(lambda: page.js("return document.querySelector('.run')?.dataset.finished"), 30,
             "the bulk run to finish")
    run = page.js("""
        const run = document.querySelector('.run');
        return {done: run.dataset.done, failed: run.dataset.failed,
                progress: run.querySelector('.progress').textContent,
                texts: [...run.querySelectorAll('.answer-text')].map(t => t.textContent),
                ids: [...run.querySelectorAll('[data-job-id]')].map(c => c.dataset.jobId)};""")
    assert (run["done"], run["failed"]) == ("5", "0"), run
    # One bulk frame: items 0..4 of one bulk (its id, then the index in 8 hex digits).
    assert run["ids"] == [run["ids"][0][:24] + f"{i:08x}" for i in range(5)], run["ids"]
    assert run["progress"].startswith("5 / 5 done · 0 failed"), run["progress"]
    assert run["texts"] == [expected_text(line, 6, FAST) for line in lines]
    page.wait_answers(1, "done")
    wait_for(lambda: page.js("return document.getElementById('st-workers').textContent") not in
             ("\N{EN DASH}", "\N{HORIZONTAL ELLIPSIS}"), 15, "the status panel to count workers")
    page.screenshot(tmp_path / "page.png")


def test_bulk_waits_for_free_slots_of_a_one_job_key(browser: WebDriver, web: str,
                                                    r: redis.Redis) -> None:
    """A key allowed one job at a time: the bulk run sends the refused lines again as slots free up."""
    key = KeyStore(r).create("browser-tiny", "tiny")[0]
    page = Page(browser, http_base(web)).open(key).connected()
    lines = [f"one at a time {i}" for i in range(1, 4)]
    page.set_value("bulk-max-tokens", "4")
    page.driver.find_element(By.ID, "bulk-prompts").send_keys("\n".join(lines))
    page.driver.find_element(By.ID, "bulk-run").click()
    wait_for(lambda: page.js("return document.querySelector('.run')?.dataset.finished"), 30,
             "the bulk run to finish")
    run = page.js("""
        const run = document.querySelector('.run');
        return {done: run.dataset.done, failed: run.dataset.failed,
                texts: [...run.querySelectorAll('.answer-text')].map(t => t.textContent)};""")
    assert (run["done"], run["failed"]) == ("3", "0"), run
    assert run["texts"] == [expected_text(line, 4, FAST) for line in lines]


def test_a_held_bulk_resumes_across_a_front_end_restart(
        browser: WebDriver, start_proc: Callable[..., Proc], sluice_env: dict[str, str],
        worker: Proc, r: redis.Redis) -> None:
    """Bulk lines held by an empty bucket show their place; the front end dies and comes back;
    the page resumes the held lines and the bulk's log, and every line completes whole."""
    raw, key = KeyStore(r).create("browser-drip", "drip")  # 10 tokens/s, all for bulks
    settings = Settings.from_env(sluice_env)
    admission = Admission.from_settings(settings, r)
    tier = admission.tier_of(key)
    admission.budget.reserve(key.key_id, "drain" + key.key_id, 600, tier.rates, prompt_tokens=600,
                             slot_ttl_ms=60_000, reservation_ttl_s=60)
    admission.budget.settle("drain" + key.key_id, 600, 0)  # empty: a line starts every ~1.4 s
    port = free_port()
    web = start_web_on(start_proc, sluice_env, port)
    page = Page(browser, f"http://127.0.0.1:{port}").open(raw).connected()
    lines = [f"drip line {i}" for i in range(1, 5)]
    page.set_value("bulk-max-tokens", "4")
    page.driver.find_element(By.ID, "bulk-prompts").send_keys("\n".join(lines))
    page.driver.find_element(By.ID, "bulk-run").click()
    metas = "return [...document.querySelectorAll('.run .meta')].map(m => m.textContent)"
    wait_for(lambda: any(m.startswith("held: ") for m in page.js(metas)), 20,
             "a line showing its place")
    web.kill(signal.SIGKILL)
    page.wait_state("reconnecting")
    start_web_on(start_proc, sluice_env, port)
    page.wait_state("open")
    wait_for(lambda: page.js("return document.querySelector('.run')?.dataset.finished"), 30,
             "the bulk run to finish")
    run = page.js("""
        const run = document.querySelector('.run');
        return {done: run.dataset.done, failed: run.dataset.failed,
                texts: [...run.querySelectorAll('.answer-text')].map(t => t.textContent)};""")
    assert (run["done"], run["failed"]) == ("4", "0"), run
    assert run["texts"] == [expected_text(line, 4, FAST) for line in lines]


def test_a_rate_limited_prompt_says_when_to_retry(browser: WebDriver, web: str,
                                                  r: redis.Redis) -> None:
    """A key out of tokens: the refused answer says it is rate limited and in how many seconds to retry."""
    key = KeyStore(r).create("browser-thin", "thin")[0]  # 600 tokens a minute
    page = Page(browser, http_base(web)).open(key).connected()
    page.set_value("max-tokens", "64")
    # Six prompts of ~70 tokens + 64 reserved each, sent faster than any can finish.
    page.js("""
        const box = document.getElementById('prompt');
        for (let i = 0; i < 6; i++) {
          box.value = `spend the budget ${i} ` + 'word '.repeat(60);
          document.getElementById('chat-form').requestSubmit();
        }""")
    def refused() -> list[dict[str, Any]]:
        return [a for a in page.answers() if a["state"] == "error"]
    first = wait_for(refused, 20, "a refused answer")[0]
    assert re.search(r"Rate limited — this key may send again in \d+ (s|min)", first["meta"]), \
        first["meta"]


def test_the_page_fits_a_phone_width(browser: WebDriver, web: str, api_key: str,
                                     tmp_path: Path) -> None:
    """At 390 px wide nothing overflows sideways and the prompt box is on screen."""
    browser.set_window_size(390, 844)
    try:
        page = Page(browser, http_base(web)).open(api_key).connected()
        page.ask("small screen")
        page.wait_answers(1, "done")
        browser.save_screenshot(str(tmp_path / "phone.png"))
        if SCREENSHOT_COPY:
            shutil.copyfile(tmp_path / "phone.png", Path(SCREENSHOT_COPY).with_stem(
                Path(SCREENSHOT_COPY).stem + "-phone"))
        wide = page.js("""
            return [...document.querySelectorAll('body *')]
              .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
              .map(e => e.id || e.className || e.tagName);""")
        assert not wide, f"wider than the {page.js('return window.innerWidth')} px window: {wide}"
        box = page.js("return document.getElementById('prompt').getBoundingClientRect().width")
        assert box > 250
    finally:
        browser.set_window_size(1280, 1000)


def test_a_refused_key_is_reported(browser: WebDriver, web: str) -> None:
    """A wrong key: the badge says so, the page explains, and it does not retry."""
    page = Page(browser, http_base(web)).open("sk-sluice-not-a-real-key")
    page.wait_state("unauthorized")
    notice = page.js("return document.getElementById('notice-text').textContent")
    assert "refused" in notice, notice
    assert page.js("return sessionStorage.getItem('sluice.key')") is None


def get_status(web: str, key: str | None) -> tuple[int, dict[str, Any]]:
    """``GET /v1/status``; return the status code and the JSON body."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(http_base(web) + "/v1/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_status_needs_a_key_and_shows_aggregates_only(web: str, api_key: str) -> None:
    """Without a key: 401.  With one: the gateway's figures, nothing about any key or job."""
    assert get_status(web, None)[0] == 401
    assert get_status(web, "sk-sluice-wrong")[0] == 401
    code, body = wait_for(lambda: (s := get_status(web, api_key))[1].get("workers_online") and s,
                          15, "the workers to answer the ping")
    assert code == 200
    assert set(body) == {"updated_at_ms", "cache_s", "problems", "jobs_running", "queue_depth",
                         "front_end", "ttft_ms", "tpot_ms", "workers_online"}
    assert body["workers_online"] >= 1
    assert body["front_end"]["open_sockets"] >= 0
    assert set(body["ttft_ms"]) == {"count", "window_s", "p50", "p90", "p99"}


def test_status_is_served_from_a_cache(web: str, api_key: str, r: redis.Redis) -> None:
    """Twenty polls in a row cost Redis at most two reads of the running set."""
    def zcards() -> int:
        return int(r.info("commandstats").get("cmdstat_zcard", {}).get("calls", 0))
    before = zcards()
    started = time.monotonic()
    for _ in range(20):
        assert get_status(web, api_key)[0] == 200
    took = time.monotonic() - started
    # One refresh per cache period (2 s), plus one if the polls straddle a boundary.
    assert zcards() - before <= 1 + int(took / 2), f"{zcards() - before} ZCARDs in {took:.1f}s"


def test_page_and_client_are_served_with_a_strict_policy(web: str) -> None:
    """/ and /static/sluice.js are served as HTML and JavaScript, locked to this origin."""
    base = http_base(web)
    with urllib.request.urlopen(base + "/", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert b'src="/static/page.js"' in response.read()
    with urllib.request.urlopen(base + "/static/sluice.js", timeout=5) as response:
        assert "javascript" in response.headers["Content-Type"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert b"export class SluiceClient" in response.read()
