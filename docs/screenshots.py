"""Screenshots of lightning-bn's TensorBoard output for the docs, taken in headless Chromium.

Trains a deliberately bad model (10 sigmoid layers with N(0, 1) weights, which saturate) for 30 steps with
``ActivationMonitor`` and ``GradientMonitor`` logging every 2 steps, serves the run with TensorBoard, and writes

* ``docs/images/custom_scalars.png``: the Custom Scalars dashboard (the "lightning-bn: activations" and
  "lightning-bn: gradients" sections), and
* ``docs/images/heatmap.png``: the Images dashboard with the ``act_saturation_heatmap`` image.

Run from the repository root (needs Chromium: ``apt-get install chromium``, or ``$CHROME_BIN``)::

    python docs/screenshots.py

It is idempotent: each run trains afresh in a temporary directory (seeded) and overwrites both PNGs. The browser
plumbing (DevTools over ``--remote-debugging-pipe``, a TensorBoard subprocess) is shared with ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_browser import Chromium, find_browser, tensorboard_server  # noqa: E402

WIDTH, HEIGHT, MAX_HEIGHT = 1400, 1000, 3000

# Opens every collapsed Custom Scalars category, wherever it sits in the shadow DOM (they start open, as lightning-bn
# writes its layout with closed=false; this only guards against TensorBoard versions that collapse them anyway).
EXPAND_JS = """(() => {
  let opened = 0;
  const walk = (node) => {
    if (!node) return;
    if (node.tagName === 'TF-CATEGORY-PANE' && node.opened === false) { node.opened = true; opened++; }
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(document.documentElement);
  return opened;
})()"""


# How much taller than the window the Custom Scalars content is (its #categories-container scrolls inside the app).
OVERFLOW_JS = """(() => {
  let overflow = 0;
  const walk = (node) => {
    if (!node) return;
    if (node.id === 'categories-container') overflow = Math.max(overflow, node.scrollHeight - node.clientHeight);
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(document.documentElement);
  return overflow;
})()"""


def demo_run(logdir: Path, steps: int = 30) -> None:
    """A 10-layer sigmoid MLP with N(0, 1) weights: its deep layers saturate, which the charts and heatmap show."""
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn

    from lightning_bn import ActivationMonitor, GradientMonitor
    from tests.helpers import BoringClassifier, mlp, trainer

    torch.manual_seed(0)
    net = mlp(10, 64, nn.Sigmoid)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
    callbacks = [ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2)]
    logger = TensorBoardLogger(logdir, name="sigmoid_10x64_normal_init", version=0, default_hp_metric=False)
    trainer(logdir, logger=logger, callbacks=callbacks, max_steps=steps).fit(BoringClassifier(net))


def settle(browser: Chromium, seconds: float = 2.0) -> None:
    """Give the charts' transitions time to finish drawing."""
    time.sleep(seconds)
    browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def screenshot_custom_scalars(browser: Chromium, url: str, path: Path) -> None:
    browser.goto(f"{url}/?darkMode=false#custom_scalars")
    text = browser.wait_for_text("lightning-bn: activations", "act_std/", "grad_norm/", timeout=30)
    if "grad_norm/" not in text:
        raise RuntimeError(f"the Custom Scalars charts did not load: {text[-2000:]}")
    browser.evaluate(EXPAND_JS)
    settle(browser)
    # Grow the window until nothing scrolls, so that both sections (all eleven charts) are in the picture.
    height = HEIGHT
    for _ in range(3):
        overflow = browser.evaluate(OVERFLOW_JS)
        if overflow <= 0:
            break
        height = min(height + overflow, MAX_HEIGHT)
        browser.resize(WIDTH, height)
        settle(browser)
    browser.screenshot(path)
    browser.resize(WIDTH, HEIGHT)


# Ticks "Show actual image size" (the heatmap is drawn to be read at 100%, not as a card thumbnail).
ACTUAL_SIZE_JS = """(() => {
  let clicked = 0;
  const walk = (node) => {
    if (!node || clicked) return;
    const tag = node.tagName || '';
    if ((tag === 'PAPER-CHECKBOX' || tag === 'MAT-CHECKBOX' || tag === 'LABEL')
        && (node.textContent || '').includes('actual image size')) {
      const box = (node.shadowRoot && node.shadowRoot.querySelector('#checkbox'))
        || node.querySelector('input') || node;
      box.click(); clicked++; return;
    }
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(document.documentElement);
  return clicked;
})()"""


def screenshot_heatmap(browser: Chromium, url: str, path: Path) -> None:
    browser.goto(f"{url}/?darkMode=false#images")
    browser.wait_for_text("act_saturation_heatmap", "step ", timeout=30)
    deadline = time.monotonic() + 30
    while not any(browser.loaded_images()):
        if time.monotonic() > deadline:
            raise RuntimeError("the act_saturation_heatmap image did not load")
        time.sleep(0.25)
    browser.evaluate(ACTUAL_SIZE_JS)
    settle(browser, 1.5)
    browser.screenshot(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    binary = find_browser()
    if binary is None:
        sys.exit("chromium not found: apt-get install chromium, or set $CHROME_BIN")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lightning-bn-screenshots-") as tmp:
        demo_run(Path(tmp) / "logs", args.steps)
        # served as the relative "logs", so that the sidebar's data location is not a random temporary path
        with tensorboard_server("logs", cwd=tmp) as url, Chromium(binary, WIDTH, HEIGHT) as browser:
            screenshot_custom_scalars(browser, url, args.out / "custom_scalars.png")
            screenshot_heatmap(browser, url, args.out / "heatmap.png")
    for name in ("custom_scalars.png", "heatmap.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
