"""Headless Chromium (Debian's package, /usr/bin/chromium) driven over its DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL on file descriptors 3 and 4), so that a test can
wait for a page, point at an element, evaluate script and take a screenshot without any network port.

    def test_page(browser):  # the fixture: skips where Chromium is absent (fails with CI=true)
        browser.open("file:///.../index.html")
        count = browser.evaluate("document.querySelectorAll('.card').length")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Self

import pytest

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags a closed network refuses the browser's own connections.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--mute-audio", "--autoplay-policy=no-user-gesture-required")



@pytest.fixture
def browser(tmp_path):
    """A `Browser` for one test; where Chromium is absent the test skips, or fails with CI=true (CI installs it)."""
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium), as .ci/run does"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true, so this is a failure)")
        pytest.skip(reason)
    with Browser(tmp_path) as opened:
        yield opened


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with a fresh profile under `folder`, one page of `width` x `height`."""

    def __init__(self, folder: Path, width: int = 1280, height: int = 1400, timeout: float = 60):
        self.timeout, self.size = timeout, (width, height)
        # The browser reads commands on descriptor 3 and writes replies on 4: bash moves the pipe ends
        # there (a preexec_fn would not be safe in a test process with threads).
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]  # never 3 or 4 themselves
        for fd in (to_browser, from_browser):
            os.close(fd)
        profile = folder / f"chromium-profile-{time.monotonic_ns()}"
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-', "bash",
             CHROMIUM, *FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=ends)
        for fd in ends:
            os.close(fd)
        self._ids, self._buffer, self.session = itertools.count(1), b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params):
        """The result of one DevTools command (events in between are dropped)."""
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                    raise BrowserError(f"{method}: no reply within {self.timeout} s")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise BrowserError(f"{method}: the browser exited: {self.process.stderr.read()[-2000:]!r}")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        """The value of a script expression in the page; a promise is awaited."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate and wait until the page has loaded and every image in it has loaded or failed."""
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.evaluate("""new Promise((resolve, reject) => {
            const deadline = Date.now() + 20000;
            const check = () => {
                if (document.readyState === "complete" && Array.from(document.images).every((i) => i.complete)) resolve(true);
                else if (Date.now() > deadline) reject(new Error("the page did not load"));
                else setTimeout(check, 50);
            };
            check();
        })""")

    def point_at(self, selector: str) -> None:
        """Move the mouse to the middle of the first element matching `selector`."""
        x, y = self.evaluate(f"""(() => {{ const r = document.querySelector({json.dumps(selector)})
            .getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(BrowserError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        self.process.stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
