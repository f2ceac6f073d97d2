"""A headless Debian chromium driven over the Chrome DevTools Protocol, for the browser test.

Nothing to install beyond the distribution's chromium and the `websockets` package (which uvicorn
already brings): no browser download, no node modules.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class CDPError(RuntimeError):
    """The browser reported an error for a command or a script."""


class Chromium:
    """A chromium process with one page; `close()` ends it (use as a context manager)."""

    def __init__(self, user_data_dir: Path, *, executable: Path = CHROMIUM, start_timeout: float = 60):
        user_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = user_data_dir.parent / "chromium.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(executable), *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port(user_data_dir / "DevToolsActivePort", start_timeout)
        self.page = Page(self._page_socket_url())

    def _wait_for_port(self, port_file: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CDPError(
                    f"chromium exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            if port_file.exists() and (lines := port_file.read_text().splitlines()):
                return int(lines[0])
            time.sleep(0.1)
        raise CDPError(f"chromium did not open its DevTools port within {timeout} s")

    def _page_socket_url(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    def close(self) -> None:
        self.page.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One page target: commands, script evaluation, mouse clicks, screenshots and console errors."""

    def __init__(self, socket_url: str):
        self._exit = contextlib.ExitStack()
        self._socket = self._exit.enter_context(connect(socket_url, max_size=None, open_timeout=10))
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"{method} got no answer within {timeout} s")
            message = json.loads(self._socket.recv(timeout=remaining))
            if message.get("id") == message_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float = 30):
        """The JSON value of `expression` (promises awaited); script exceptions raise CDPError."""
        result = self.call(
            "Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"script failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.2):
        """Evaluate `expression` until it is truthy; return that value or raise after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout} s waiting for: {expression}")
            time.sleep(interval)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser-logged errors seen so far."""
        self.call("Runtime.evaluate", expression="0")  # drain events that arrived since the last call
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
        return errors

    def close(self) -> None:
        self._exit.close()
