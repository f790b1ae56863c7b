"""Screenshots of lightning-bn's TensorBoard output for the docs, taken in headless Chromium.

Trains three small seeded runs on the CPU (no download: sklearn's bundled 8x8 digits, random tokens, configs only),
serves each with TensorBoard and writes

* ``docs/images/lightning_bn_tab.png``: the lightning-bn tab on a 10-block conv-BN-ReLU CNN trained on the digits
  with ``ActivationMonitor`` and ``GradientMonitor`` logging every 2 steps; at step 40 one block's BatchNorm gets a
  bias of -1e3, so its ReLU dies: its row carries the flag from that step and its curves are open;
* ``docs/images/lightning_bn_tab_bert.png``: the tab on a 6-layer transformers BERT (hidden 64, random weights,
  over 60 watched layers) trained on a synthetic token classification task; at step 40 one encoder layer's
  intermediate dense gets a bias of -1e3, so its GELU dies; the window is as tall as the tab, so every row is in it;
* ``docs/images/heatmap.png``: the Images dashboard with the ``act_saturation_heatmap`` of a 10-layer sigmoid MLP
  with N(0, 1) weights, whose deep layers saturate.

Run from the repository root (needs Chromium: ``apt-get install chromium``, or ``$CHROME_BIN``; and ``transformers``
and ``scikit-learn`` for the first two)::

    python docs/screenshots.py [--out DIR]

It is idempotent: each run trains afresh in a temporary directory (seeded) and overwrites the PNGs. The browser
plumbing (DevTools over ``--remote-debugging-pipe``, a TensorBoard subprocess) is shared with ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_browser import Chromium, find_browser, tensorboard_server  # noqa: E402

WIDTH, HEIGHT, MAX_WIDTH, MAX_HEIGHT = 1400, 1000, 3200, 8000
MARGIN = 24  # px right of the tab's grid (its last axis label runs past the last strip)
EVERY, STEPS, FAULT_STEP = 2, 60, 40
#: the CNN block whose BatchNorm bias is set to -1e3 at FAULT_STEP, and the BERT layer whose intermediate dense is
CNN_KILLED, BERT_KILLED = 6, 3


def _fault(apply):
    """A callback that calls ``apply(module)`` (under no_grad) before the training batch of step FAULT_STEP."""
    import lightning.pytorch as pl
    import torch

    class Fault(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == FAULT_STEP:
                with torch.no_grad():
                    apply(module)

    return Fault()


def _fit(logdir: Path, name: str, module, callbacks: list, steps: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_bn import ActivationMonitor, GradientMonitor
    from tests.helpers import trainer

    monitors = [ActivationMonitor(every_n_steps=EVERY), GradientMonitor(every_n_steps=EVERY)]
    logger = TensorBoardLogger(logdir, name=name, version=0, default_hp_metric=False)
    trainer(logdir, logger=logger, callbacks=monitors + callbacks, max_steps=steps).fit(module)


def cnn_run(logdir: Path, steps: int = STEPS) -> str:
    """10 conv-BN-ReLU blocks on sklearn's 8x8 digits; block CNN_KILLED's ReLU killed at FAULT_STEP."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import TensorDataset

    from tests.helpers import BoringClassifier

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    data = TensorDataset((x - x.mean()) / x.std(), torch.tensor(digits.target))
    block = lambda c_in, c_out: nn.Sequential(  # noqa: E731
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )
    features = nn.Sequential(block(1, 16), *(block(16, 16) for _ in range(9)))
    net = nn.Sequential()
    net.add_module("features", features)
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", nn.Flatten())
    net.add_module("head", nn.Linear(16, 10))

    def kill(module):
        module.net.features[CNN_KILLED][1].bias.fill_(-1e3)

    _fit(logdir, "cnn_digits", BoringClassifier(net, lr=0.05, batch_size=64, data=data), [_fault(kill)], steps)
    return "cnn_digits/version_0"


def bert_run(logdir: Path, steps: int = STEPS) -> str:
    """A 6-layer BERT (hidden 64) classifying random token sequences; layer BERT_KILLED's GELU killed at FAULT_STEP."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    vocab, seq = 100, 16
    config = BertConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=2 * seq, type_vocab_size=2, num_labels=3,
    )  # fmt: skip
    ids = torch.randint(0, vocab, (1024, seq), generator=torch.Generator().manual_seed(1))
    labels = ids[:, 1] % 3  # learnable: the class of the first token after [CLS]'s place

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = BertForSequenceClassification(config)
            self.example_input_array = ids[:32]

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def train_dataloader(self):
            return DataLoader(TensorDataset(ids, labels), batch_size=32, shuffle=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def kill(module):
        module.model.bert.encoder.layer[BERT_KILLED].intermediate.dense.bias.fill_(-1e3)

    _fit(logdir, "bert_6x64", Classifier(), [_fault(kill)], steps)
    return "bert_6x64/version_0"


def sigmoid_run(logdir: Path, steps: int = 30) -> str:
    """A 10-layer sigmoid MLP with N(0, 1) weights: its deep layers saturate, which the heatmap shows."""
    import torch
    from torch import nn

    from tests.helpers import BoringClassifier, mlp

    torch.manual_seed(0)
    net = mlp(10, 64, nn.Sigmoid)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
    _fit(logdir, "sigmoid_10x64_normal_init", BoringClassifier(net), [], steps)
    return "sigmoid_10x64_normal_init/version_0"


def settle(browser: Chromium, seconds: float = 2.0) -> None:
    """Give the page's transitions time to finish drawing."""
    time.sleep(seconds)
    browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


#: the body of the lightning-bn tab's iframe (null until TensorBoard has made it)
FRAME = (
    "(() => { const f = document.querySelector('iframe'); return f && f.contentDocument && f.contentDocument.body; })()"
)

#: how much room the tab's content wants beyond its iframe: [extra width, extra height] (the iframe scrolls inside).
#: The width is the grid's at max-content (measured, then put back): in a narrower window its name column shrinks
#: and long names run into the next column rather than making the page scroll.
TAB_OVERFLOW_JS = f"""(() => {{
  const b = {FRAME}; const d = b.ownerDocument.documentElement;
  let width = d.scrollWidth;
  const grid = b.querySelector('.grid');
  if (grid) {{
    const old = grid.style.width;
    grid.style.width = 'max-content';
    width = Math.max(width, Math.ceil(grid.getBoundingClientRect().right) + {MARGIN});
    grid.style.width = old;
  }}
  const height = Math.ceil(b.getBoundingClientRect().bottom) + {MARGIN};
  return [width - d.clientWidth, height - d.clientHeight];
}})()"""


def screenshot_tab(browser: Chromium, url: str, path: Path, open_row: str | None = None) -> list:
    """The lightning-bn tab, the window grown until nothing in the tab scrolls; returns its rows as
    ``[layer, shown name, [[flag, first step], ...]]``."""
    browser.goto(f"{url}/?darkMode=false#lightning_bn")
    deadline = time.monotonic() + 40
    while not browser.evaluate(f"(() => {{ const b = {FRAME}; return !!(b && b.dataset.loaded); }})()"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the lightning-bn tab did not load: {browser.text()[-2000:]}")
        time.sleep(0.25)
    if open_row:  # a click on a row's name opens its curves
        browser.evaluate(f"{FRAME}.querySelector('.row[data-layer=\"{open_row}\"] .name').click()")
    settle(browser, 1.0)
    width, height = WIDTH, HEIGHT
    for _ in range(4):  # wider until the grid fits, as tall as the tab (shorter too: no blank band at the bottom)
        extra_w, extra_h = browser.evaluate(TAB_OVERFLOW_JS)
        if extra_w <= 0 and abs(extra_h) <= 2:
            break
        width = min(width + max(extra_w, 0), MAX_WIDTH)
        height = min(height + extra_h, MAX_HEIGHT)
        browser.resize(width, height)
        settle(browser, 1.0)
    rows = json.loads(
        browser.evaluate(
            f"JSON.stringify([...{FRAME}.querySelectorAll('.row')].map((r) => [r.dataset.layer, "
            "r.querySelector('.name').textContent, "
            "[...r.querySelectorAll('.flag')].map((f) => [f.dataset.flag, f.dataset.firstStep])]))"
        )
    )
    browser.screenshot(path)
    browser.resize(WIDTH, HEIGHT)
    return rows


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


def _describe(name: str, rows: list) -> None:
    """Print the rows and their flags; fail if a shown name is not its layer's name less the prefix common to all."""
    dropped = {len(layer.split(".")) - len(shown.split(".")) for layer, shown, _ in rows}
    if len(dropped) > 1 or any(not (layer == shown or layer.endswith("." + shown)) for layer, shown, _ in rows):
        raise RuntimeError(f"{name}: the tab shortened names by more than their common prefix: {rows}")
    flagged = [f"{layer} ({', '.join(f'{f} @{s}' for f, s in flags)})" for layer, _, flags in rows if flags]
    print(f"{name}: {len(rows)} rows; flagged: {'; '.join(flagged) or 'none'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of the two tab runs")
    args = parser.parse_args(argv)
    binary = find_browser()
    if binary is None:
        sys.exit("chromium not found: apt-get install chromium, or set $CHROME_BIN")
    args.out.mkdir(parents=True, exist_ok=True)
    shots = [
        ("cnn", cnn_run, "lightning_bn_tab.png", f"net.features.{CNN_KILLED}.2"),
        ("bert", bert_run, "lightning_bn_tab_bert.png", None),
    ]
    with tempfile.TemporaryDirectory(prefix="lightning-bn-screenshots-") as tmp:
        for name, run, png, open_row in shots:
            # each run in its own log directory, served as the relative "logs" (no random temporary path in sight)
            run(Path(tmp) / name / "logs", args.steps)
            with tensorboard_server("logs", cwd=Path(tmp) / name) as url, Chromium(binary, WIDTH, HEIGHT) as browser:
                _describe(name, screenshot_tab(browser, url, args.out / png, open_row))
            print(args.out / png)
        sigmoid_run(Path(tmp) / "sigmoid" / "logs")
        with tensorboard_server("logs", cwd=Path(tmp) / "sigmoid") as url, Chromium(binary, WIDTH, HEIGHT) as browser:
            screenshot_heatmap(browser, url, args.out / "heatmap.png")
        print(args.out / "heatmap.png")


if __name__ == "__main__":
    main()
