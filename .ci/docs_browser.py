"""Run by `nox -s docs-browser`: opens the built site in headless Chromium, takes screenshots
and checks that search works and that site/index.html can be browsed from disk.

    python .ci/docs_browser.py [SITE_DIR] [--out FOLDER] [--chromium PATH]

Serves SITE_DIR (site/ unless told) with the standard library's http.server on 127.0.0.1
(search needs http: browsers refuse the search worker's fetch on file://) and drives
Chromium through the DevTools protocol over a pipe (`--remote-debugging-pipe`), so it
needs nothing beyond the standard library and a Chromium binary. It:

1. takes a screenshot of the home page, getting-started, your-data and the
   TwoTowerRetrieval API page (your-data is skipped with a note while docs/your-data.md
   does not exist; once it does, its page must render);
2. opens `index.html?q=Vocabulary` and waits (in real time) until the search worker has
   indexed the site and shows its results: at least one hit is required;
3. opens file://.../index.html, clicks the link to the getting-started page and checks
   that Chromium shows that page, styled.

Why search never left "Initializing search" before: `--dump-dom --virtual-time-budget`
snapshots the page when the budget of *virtual* time has passed, and virtual time runs
ahead as soon as the page's own thread is idle; mkdocs-material builds the search index
in a Web Worker, whose work the budget does not wait for. The page was dumped within a
second, before the worker had answered. Waiting on the result element itself, in real
time, fixes it; served over file:// the worker cannot load the index at all.

Chromium never reaches the network: every host but 127.0.0.1 resolves to nothing, so the
Google Fonts link falls back to system fonts at once instead of waiting on a timeout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--hide-scrollbars", "--remote-debugging-pipe",
]  # fmt: skip
WIDTH, HEIGHT = 1280, 1000
# (screenshot name, page, a text its <h1> must contain)
PAGES = [
    ("home", "index.html", "two_tower"),
    ("getting-started", "getting-started.html", "Getting started"),
    ("your-data", "your-data.html", ""),
    ("api-two-tower-retrieval", "api/two_tower_retrieval.html", "TwoTowerRetrieval"),
]
# page -> its source: skipped while the source does not exist, required once it does.
OPTIONAL = {"your-data.html": "docs/your-data.md"}


class BrowserError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium driven through the DevTools protocol over fds 3 and 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def map_fds() -> None:  # Chromium reads commands on fd 3 and writes on fd 4.
            # The four pipe ends took the lowest free numbers, so 3 and 4 are ours and
            # Popen's own error pipe is above them; pass_fds keeps 3 and 4 open.
            high_r, high_w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=map_fds, pass_fds=(3, 4),
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride", session=True,
            width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._get(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _get(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        try:
            reply = self._messages.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise BrowserError(f"Chromium did not answer {waiting_for} in time") from None
        if reply is None:
            raise BrowserError(f"Chromium exited (code {self.process.poll()})")
        return reply

    def wait_for_load(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                if event.get("method") == "Page.loadEventFired":
                    self._events.clear()
                    return
            self._events.clear()
            self._events.append(self._get(deadline, "the page's load event"))

    def open(self, url: str) -> None:
        self._events.clear()
        result = self.call("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_for_load()

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float) -> Any:
        """Polls a JavaScript expression in real time until it is truthy; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        return None

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(BrowserError):
            self.call("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# The page's h1, and whether the theme's stylesheet applied (the header is coloured).
PAGE_STATE = """JSON.stringify({
  h1: ((document.querySelector("article h1") || {}).textContent || "").replace("\u00b6", "").trim(),
  styled: getComputedStyle(document.querySelector("header.md-header") || document.body)
    .backgroundColor !== "rgba(0, 0, 0, 0)",
  title: document.title,
})"""
SEARCH_STATE = """(() => {
  const meta = document.querySelector(".md-search-result__meta");
  const text = meta ? meta.textContent.trim() : "";
  if (!text || /initializing/i.test(text)) return null;
  const hits = [...document.querySelectorAll(".md-search-result__item > a")];
  return JSON.stringify({meta: text, hits: hits.map(a => [
    (a.querySelector("h1, h2") || a).textContent.trim(), a.getAttribute("href")])});
})()"""


def check(site: Path, out: Path, binary: str) -> list[str]:
    failures = []
    with tempfile.TemporaryDirectory(prefix="docs-browser-profile-") as profile:
        browser = Chromium(binary, Path(profile))  # before the server's thread: it forks
        server = serve(site)
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            for name, page, heading in PAGES:
                if page in OPTIONAL and not (ROOT / OPTIONAL[page]).exists():
                    print(f"note: {page} skipped: {OPTIONAL[page]} does not exist yet")
                    continue
                if not (site / page).exists():
                    failures.append(f"{page} is not in the built site (rebuild it: nox -s docs)")
                    continue
                try:
                    browser.open(base + page)
                    state = json.loads(browser.evaluate(PAGE_STATE))
                    browser.screenshot(out / f"{name}.png")
                except BrowserError as error:
                    failures.append(f"{page}: {error}")
                    continue
                print(f"{out / (name + '.png')}: {page}, h1 {state['h1']!r}")
                if heading not in state["h1"] or not state["styled"]:
                    failures.append(f"{page}: h1 {state['h1']!r} (expected {heading!r}), "
                                    f"styled={state['styled']}")  # fmt: skip
            failures += check_search(browser, base, out)
            failures += check_file_url(browser, site, out)
        finally:
            browser.close()
            server.shutdown()
    return failures


def check_search(browser: Chromium, base: str, out: Path) -> list[str]:
    start = time.monotonic()
    browser.open(base + "index.html?q=Vocabulary")
    state = browser.wait_until(SEARCH_STATE, timeout=30)
    browser.screenshot(out / "search-vocabulary.png")
    if state is None:
        meta = browser.evaluate(
            "((document.querySelector('.md-search-result__meta') || {}).textContent || '').trim()"
        )
        return [f"search for 'Vocabulary' gave no results in 30 s (the page says {meta!r})"]
    result = json.loads(state)
    print(f"search 'Vocabulary': {result['meta']!r} after {time.monotonic() - start:.1f} s; "
          f"first hits: {result['hits'][:3]}")  # fmt: skip
    if not result["hits"]:
        return [f"search for 'Vocabulary' found nothing: {result['meta']!r}"]
    return []


def check_file_url(browser: Chromium, site: Path, out: Path) -> list[str]:
    """Browsing from disk: index.html's link to getting-started.html leads to that page."""
    browser.open((site / "index.html").resolve().as_uri())
    link = browser.evaluate("""(() => {
      const a = [...document.querySelectorAll("a[href]")]
        .find(a => /^getting-started(\\.html)?\\/?$/.test(a.getAttribute("href")));
      if (!a) return null;
      const href = a.getAttribute("href");
      a.click();
      return href;
    })()""")
    if link is None:
        return ["file://: index.html has no link to getting-started"]
    try:
        browser.wait_for_load()
    except BrowserError as error:
        return [f"file://: following {link!r} from index.html: {error}"]
    url = browser.evaluate("location.href")
    state = json.loads(browser.evaluate(PAGE_STATE))
    browser.screenshot(out / "file-getting-started.png")
    print(f"file://: index.html's link {link!r} opened {url}, h1 {state['h1']!r}, "
          f"styled={state['styled']}")  # fmt: skip
    if "Getting started" not in state["h1"] or not state["styled"]:
        return [f"file://: the link {link!r} from index.html opened {url}, not the styled "
                "getting-started page (is use_directory_urls false in mkdocs.yml?)"]  # fmt: skip
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default=str(ROOT / "site"))
    parser.add_argument("--out", help="screenshot folder (default: a new temporary folder)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    site = Path(args.site).resolve()
    if not (site / "index.html").exists():
        print(f"{site}/index.html not found: build the site first (nox -s docs)")
        return 1
    out = Path(args.out or tempfile.mkdtemp(prefix="two_tower-docs-screenshots-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"screenshots go to {out}")
    start = time.monotonic()
    failures = check(site, out, args.chromium)
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"docs-browser: {len(failures)} failure(s) in {time.monotonic() - start:.1f} s; "
          f"screenshots in {out}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
