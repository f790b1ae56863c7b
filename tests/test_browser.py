"""End to end in a real browser: a short Lightning run with ``ActivationMonitor`` and ``GradientMonitor``, TensorBoard
serving its log directory, and headless Chromium rendering the Custom Scalars (with ``per_layer_scalars=True``) and
Images dashboards.

``chromium --dump-dom`` is not enough here: TensorBoard's Polymer dashboards draw their chart titles inside shadow
roots, which the dumped light DOM does not contain. So Chromium is driven over the Chrome DevTools Protocol, spoken on
``--remote-debugging-pipe`` (NUL-terminated JSON on file descriptors 3 and 4: no websocket, no extra package), and a
line of JavaScript collects the text of every shadow root. ``docs/screenshots.py`` reuses :class:`Chromium` and
:func:`tensorboard_server` to take the screenshots in the docs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Chromium wants its DevTools pipe on exactly fds 3 (commands in) and 4 (replies out). subprocess cannot place a pipe
# on a chosen number without preexec_fn (unsafe once torch has started threads), so a tiny Python shim moves them.
_PIPE_SHIM = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execvp(sys.argv[3], sys.argv[3:])"
)

# All text on the page, shadow roots included (TensorBoard's dashboards live in them), styles and scripts left out.
PAGE_TEXT_JS = """(() => {
  const out = [];
  const walk = (node) => {
    if (!node) return;
    if (node.nodeType === Node.TEXT_NODE) { out.push(node.textContent); return; }
    if (node.nodeType === Node.ELEMENT_NODE && ['STYLE', 'SCRIPT', 'TEMPLATE'].includes(node.tagName)) return;
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) walk(child);
  };
  walk(document.documentElement);
  return out.join(' ').replace(/\\s+/g, ' ');
})()"""

# Natural widths of the <img> elements TensorBoard has loaded from its image plugin (shadow roots included).
LOADED_IMAGES_JS = """(() => {
  const sizes = [];
  const walk = (node) => {
    if (!node) return;
    if (node.tagName === 'IMG' && node.complete && String(node.src).includes('/data/plugin/images/'))
      sizes.push(node.naturalWidth);
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(document.documentElement);
  return sizes;
})()"""


class DevToolsError(RuntimeError):
    """An error answer to a DevTools command, or an exception thrown by evaluated JavaScript."""


def find_browser() -> str | None:
    """A Chromium or Chrome binary: ``$CHROME_BIN`` if set, else the first of :data:`BROWSERS` on ``PATH``."""
    if os.environ.get("CHROME_BIN"):
        return shutil.which(os.environ["CHROME_BIN"])
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class Chromium:
    """Headless Chromium, driven over the DevTools protocol on ``--remote-debugging-pipe``, with one page attached."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="lightning-bn-chromium-")
        to_chrome, self._out = (self._high(fd) for fd in os.pipe())
        self._in, from_chrome = (self._high(fd) for fd in os.pipe())
        args = [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PIPE_SHIM, str(to_chrome), str(from_chrome), *args],
            pass_fds=(to_chrome, from_chrome),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._id = 0
        try:
            page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _high(fd: int) -> int:
        """``fd`` moved to a number >= 10 (close-on-exec), out of the way of 3 and 4."""
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def call(self, method: str, session: str | None = None, timeout: float = 20, **params):
        """Send one DevTools command and return its result; events in between are dropped."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise DevToolsError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()}) during {method}")
                self._buffer += chunk

    def page(self, method: str, **params):
        return self.call(method, session=self.session, **params)

    def goto(self, url: str) -> None:
        """Load ``url`` afresh (through about:blank, so that a change of ``#hash`` alone reloads the app too)."""
        self.page("Page.navigate", url="about:blank")
        self.page("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"javascript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        """All the rendered text on the page, shadow roots included."""
        return self.evaluate(PAGE_TEXT_JS) or ""

    def wait_for_text(self, *needles: str, timeout: float = 15) -> str:
        """Poll the page's text until it contains every one of ``needles``; return it, or the last text on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text()
            except DevToolsError:  # between documents while the page loads
                text = ""
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(0.25)

    def loaded_images(self) -> list[int]:
        """Natural widths of the images that TensorBoard's image plugin has loaded on the page."""
        try:
            return self.evaluate(LOADED_IMAGES_JS) or []
        except DevToolsError:
            return []

    def resize(self, width: int, height: int) -> None:
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: str | os.PathLike) -> None:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._out)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def tensorboard_server(
    logdir: str | os.PathLike, timeout: float = 40, cwd: str | os.PathLike | None = None
) -> Iterator[str]:
    """Serve ``logdir`` (relative to ``cwd``, if given) with TensorBoard on a free local port; yield its base URL once
    it answers HTTP and has loaded a run (so the dashboards have data from their first request). The server is always
    terminated on exit."""
    log = tempfile.TemporaryFile()
    deadline = time.monotonic() + timeout
    proc = None
    try:
        while True:
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
                + ["--host", "127.0.0.1", "--load_fast=false", "--reload_interval=1"],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    if _get_json(f"{url}/data/runs"):
                        yield url
                        return
                time.sleep(0.2)
            if proc.poll() is None or time.monotonic() >= deadline:  # still starting, out of time
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise TimeoutError(f"TensorBoard did not serve {logdir} within {timeout} s:\n{tail}")
            proc = None  # it exited (the port was taken in between?): try another one
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def _load(browser: Chromium, url: str, *needles: str, attempts: int = 2, timeout: float = 10) -> str:
    """Load ``url`` until its text shows all of ``needles`` (reloading up to ``attempts`` times); return the text."""
    for _ in range(attempts):
        browser.goto(url)
        text = browser.wait_for_text(*needles, timeout=timeout)
        if all(n in text for n in needles):
            break
    return text


@pytest.fixture
def browser_binary() -> str:
    if sys.platform == "win32":
        pytest.skip("the DevTools pipe needs POSIX file descriptors")
    binary = find_browser()
    if binary is None:
        pytest.skip(
            "chromium not found: install it with apt-get install chromium (.ci/run does), "
            "or point $CHROME_BIN at a Chromium/Chrome binary"
        )
    try:  # e.g. Ubuntu's chromium-browser without snapd is a stub that only prints how to install the snap
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{binary} does not run: {exc}")
    if version.returncode != 0 or not any(name in version.stdout for name in ("Chromium", "Chrome")):
        pytest.skip(f"{binary} does not run: {(version.stdout + version.stderr).strip()[-300:]}")
    return binary


def test_tensorboard_renders_custom_scalars_and_heatmap(tmp_path, browser_binary):
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn

    from lightning_bn import ActivationMonitor, GradientMonitor
    from tests.helpers import BoringClassifier, mlp, trainer

    logdir = tmp_path / "logs"
    # the Custom Scalars layout comes with the opt-in per-layer scalars (the default writes one compact record)
    callbacks = [ActivationMonitor(every_n_steps=2, per_layer_scalars=True),
                 GradientMonitor(every_n_steps=2, per_layer_scalars=True)]  # fmt: skip
    trainer(tmp_path, logger=TensorBoardLogger(logdir), callbacks=callbacks, max_steps=6).fit(
        BoringClassifier(mlp(2, 16, nn.Tanh))
    )

    with tensorboard_server(logdir) as url, Chromium(browser_binary) as browser:
        # "act_std/" and "grad_norm/" are the series in the charts' legends: present once the data has arrived
        text = _load(browser, f"{url}/?darkMode=false#custom_scalars", "act_std/", "grad_norm/")
        for title in ("lightning-bn: activations", "lightning-bn: gradients", "act_std", "grad_norm"):
            assert title in text, f"{title!r} is not on the rendered Custom Scalars page: {text[-3000:]}"

        text = _load(browser, f"{url}/?darkMode=false#images", "act_saturation_heatmap", "step ")
        assert "act_saturation_heatmap" in text, f"no heatmap on the rendered Images page: {text[-3000:]}"
        deadline = time.monotonic() + 10
        while not any(browser.loaded_images()) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert any(browser.loaded_images()), "the heatmap <img> did not load"
