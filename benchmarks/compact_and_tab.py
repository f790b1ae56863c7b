"""Event-file bytes per logging step and the lightning-bn tab's load time (its data build, its JSON, and the page in
headless Chromium), per-layer scalars against the compact record (``per_layer_scalars=False``), in one run::

    python benchmarks/compact_and_tab.py                 # 61 layers x 1,000 logging steps; writes COMPACT_AND_TAB.md
    python benchmarks/compact_and_tab.py --steps 200     # a shorter log
    python benchmarks/compact_and_tab.py --no-browser    # without Chromium: bytes and data build only

Both logs are written the way the monitors write them: ``lightning_bn.writers.Destination.of_writer(SummaryWriter,
per_layer_scalars=...)``, one destination for the activation figures and one for the gradient figures (as
``ActivationMonitor`` and ``GradientMonitor`` each publish their own), the layers table at step 0. A step's figures
are shaped like a real step's metrics dict (``lightning_bn.tags``): every activation statistic of each of
``--layers`` layers (act_std, act_saturation, act_dead, act_transmission, ...), grad_norm / update_ratio /
weight_norm of each layer's weight and bias, the total gradient norm and the loss; values are random. Bytes are the
event file's size over the logging steps; the tab's build time is ``lightning_bn.tb_plugin.data.run_data`` (what the
tab's ``/run`` route returns), best of ``--reps``, each form in the same process; the JSON is the ``/run`` route's
answer. The page load: a real TensorBoard (``tests.test_browser.tensorboard_server``) on the run and headless
Chromium (``tests.test_browser.Chromium``) navigated to ``#lightning_bn``, timed until the tab's status line under
its grid ("61 of 61 layers, 1000 logged steps", written once every row is drawn) is there: the first load (cold: the
plugin builds the run's data) and the median of ``--loads`` more (the plugin's cached JSON). The *before* columns
are figures measured the same way at commit 67f43be (before issue #25's work), kept here as numbers. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("COMPACT_AND_TAB.md")


def write_log(directory: Path, steps: int, layers: int, per_layer_scalars: bool) -> tuple[Path, int]:
    """A monitors' log of ``steps`` logging steps x ``layers`` layers in one form; its event file and figure count."""
    from _synthetic import layers_table, monitor_tags  # the script's directory is on sys.path
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn.tags import LOSS_TAG, TOTAL_GRADIENT_TAG
    from lightning_bn.writers import Destination

    rng = random.Random(0)
    names = [f"model.encoder.layer.{i}" for i in range(layers)]
    act_tags, grad_tags = monitor_tags(names, ("weight", "bias"))
    writer = SummaryWriter(str(directory), max_queue=1000, flush_secs=3600)
    activations = Destination.of_writer(writer, per_layer_scalars=per_layer_scalars)
    gradients = Destination.of_writer(writer, per_layer_scalars=per_layer_scalars)
    activations.write_layers(layers_table(names, "gelu"))
    for step in range(steps):
        act = {key: rng.uniform(0.05, 0.5) for key in act_tags}
        act[LOSS_TAG] = rng.uniform(0.1, 2.0)
        activations.publish(act, [], step)
        grad = {key: rng.uniform(0.05, 0.5) for key in grad_tags}
        grad[TOTAL_GRADIENT_TAG] = rng.uniform(0.5, 5.0)
        gradients.publish(grad, [], step)
    writer.close()
    [event_file] = directory.glob("events.out.tfevents.*")
    return event_file, len(act_tags) + len(grad_tags) + 2


def scalar_tags(run: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 1, "tensors": 1})
    acc.Reload()
    return len(acc.Tags()["scalars"])


def build_time(run: Path, reps: int) -> tuple[float, dict]:
    from lightning_bn.tb_plugin.data import run_data

    best, data = float("inf"), {}
    for _ in range(reps):
        start = time.perf_counter()
        data = run_data(run, run.name)
        best = min(best, time.perf_counter() - start)
    return best, data


# The tab's page in TensorBoard's iframe: the status line under the grid once every row is drawn ("61 of 61 layers,
# 1000 logged steps"), or null while it loads.
_DRAWN_JS = """(() => {
  const f = document.querySelector('iframe');
  const b = f && f.contentDocument && f.contentDocument.body;
  const c = b && b.querySelector('.count');
  return c ? c.textContent : null;
})()"""


# The tab's own milliseconds of its last load (fetch + parse of the run's JSON, drawing), or null before it has any
_TIMING_JS = """(() => {
  const f = document.querySelector('iframe');
  const b = f && f.contentDocument && f.contentDocument.body;
  return (b && b.dataset.timing) || null;
})()"""


def browser_load(
    run: Path, loads: int, settle: float = 0.0, timeout: float = 120
) -> tuple[list[float], int, list[dict]] | str:
    """Seconds from navigating headless Chromium to TensorBoard's ``#lightning_bn`` until the tab's status line says
    every layer is drawn, for ``loads`` page loads of one TensorBoard server on ``run`` (the first one cold: the
    plugin builds the run's data; later ones reuse its cache), and the bytes of the ``/run`` JSON; or why not. The
    first navigation comes ``settle`` seconds after TensorBoard first answers (and has loaded the run)."""
    from tests.test_browser import Chromium, DevToolsError, find_browser, tensorboard_server

    binary = find_browser()
    if binary is None:
        return "no Chromium found"
    import urllib.request

    times: list[float] = []
    timings: list[dict] = []
    with tensorboard_server(run, timeout=120) as url, Chromium(binary) as browser:
        time.sleep(settle)
        for _ in range(loads):
            browser.page("Page.navigate", url="about:blank")
            start = time.perf_counter()
            browser.page("Page.navigate", url=f"{url}/?darkMode=false#lightning_bn")
            text = None
            while time.perf_counter() - start < timeout:
                try:
                    text = browser.evaluate(_DRAWN_JS)
                except DevToolsError:
                    text = None
                if text and " of " in text:
                    break
                time.sleep(0.02)
            else:
                return f"the tab did not draw within {timeout:.0f} s"
            times.append(time.perf_counter() - start)
            timing = browser.evaluate(_TIMING_JS)
            timings.append(json.loads(timing) if timing else {})
        with urllib.request.urlopen(f"{url}/data/plugin/lightning_bn/run?run=.", timeout=60) as response:
            size = len(response.read())
    return times, size, timings


#: measured at commit 67f43be (before issue #25's work) with this script's log, 61 layers x 1,000 logging steps, on
#: the machine of the *after* figures (2 cores, shared, load ~3): run_data best of 3, page loads as below
BEFORE = {
    "per-layer scalars": {"per_step": 46_005, "build_s": 2.17, "json": 8_696_744, "cold_s": 14.25, "warm_s": 6.56},
    "compact record": {"per_step": 10_963, "build_s": 2.06, "json": 8_696_744, "cold_s": 7.65, "warm_s": 3.98},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--reps", type=int, default=3, help="tab data builds per form, best taken (default 3)")
    parser.add_argument("--loads", type=int, default=3, help="page loads after the first, median taken (default 3)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the settled first load (default 5)")
    parser.add_argument("--no-browser", action="store_true", help="skip the page loads in headless Chromium")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown written (default: next to this)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lightning_bn.tb_plugin.plugin import _json

    began = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="compact_and_tab_") as tmp:
        for form, per_layer in (("per-layer scalars", True), ("compact record", False)):
            run = Path(tmp) / ("per_layer" if per_layer else "compact")
            start = time.perf_counter()
            event_file, figures = write_log(run, args.steps, args.layers, per_layer)
            written = time.perf_counter() - start
            size = event_file.stat().st_size
            seconds, data = build_time(run, args.reps)
            page = "skipped (--no-browser)" if args.no_browser else browser_load(run, 1 + args.loads)
            settled = "skipped" if args.no_browser else browser_load(run, 1, settle=args.settle)
            results[form] = r = {
                "bytes": size,
                "per_step": size / args.steps,
                "written_s": written,
                "build_s": seconds,
                "json": len(_json(data).get_data()),
                "tags": scalar_tags(run),
                "figures": figures,
                "layers": len(data["layers"]),
                "steps": len(data["steps"]),
                "digest": json.dumps(data["figures"], sort_keys=True),
                "page": page,
                "settled": settled,
            }
            shown = page if isinstance(page, str) else f"first load {page[0][0]:.2f} s, then {_seconds(page[0][1:])}"
            print(
                f"{form}: {size / 1e6:.2f} MB ({r['per_step']:.0f} B/step), written in {written:.1f} s, "
                f"tab data {seconds:.2f} s, JSON {r['json'] / 1e6:.2f} MB, {r['tags']} scalar tags, "
                f"{r['layers']} layers x {r['steps']} steps; page: {shown}; first load {args.settle:.0f} s after "
                f"TensorBoard answered: {settled if isinstance(settled, str) else f'{settled[0][0]:.2f} s'}",
                flush=True,
            )
    a, b = results["per-layer scalars"], results["compact record"]
    same = a["digest"] == b["digest"]
    load = os.getloadavg()
    standard = (args.steps, args.layers) == (1_000, 61)

    def page_cells(r: dict) -> str:
        if isinstance(r["page"], str):
            return f"{r['page']} | {r['page']} | -"
        cold, warm = r["page"][0][0], r["page"][0][1:]
        draws = [t.get("draw_ms") for t in r["page"][2][1:] if t.get("draw_ms") is not None]
        draw = f"{statistics.median(draws):.0f}" if draws else "-"
        return (f"{cold:.2f} | {statistics.median(warm):.2f}" if warm else f"{cold:.2f} | -") + f" | {draw}"

    rows = []
    for form, r in results.items():
        before = BEFORE[form] if standard else None
        cells = [
            f"{before['per_step']:,}" if before else "-",
            f"{r['per_step']:,.0f}",
            f"{before['build_s']:.2f}" if before else "-",
            f"{r['build_s']:.2f}",
            f"{before['json'] / 1e6:.2f}" if before else "-",
            f"{r['json'] / 1e6:.2f}",
            f"{before['cold_s']:.2f} | {before['warm_s']:.2f}" if before else "- | -",
            page_cells(r),
            r["settled"] if isinstance(r["settled"], str) else f"{r['settled'][0][0]:.2f}",
        ]
        rows.append(f"| {form} | " + " | ".join(cells) + " |")
    text = [
        "# Compact record against per-layer scalars: event-file size and the tab's load time",
        "",
        f"Generated by `python benchmarks/compact_and_tab.py --steps {args.steps} --layers {args.layers}` in "
        f"{time.perf_counter() - began:.0f} s. Do not edit by hand; rerun it.",
        "",
        f"- {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.machine()}; load average at "
        f"the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (a shared machine: single runs are noisy).",
        f"- Synthetic log: {args.steps} logging steps x {args.layers} layers, {a['figures']} figures a step (every "
        "activation statistic per layer; grad_norm / update_ratio / weight_norm per weight and bias; total gradient "
        "norm, loss), written through `lightning_bn.writers.Destination.of_writer(SummaryWriter, "
        "per_layer_scalars=...)` with one destination per monitor (two events a step), plus the layers table. "
        "No histograms.",
        f"- *tab data*: `lightning_bn.tb_plugin.data.run_data` (the `/run` route's JSON), best of {args.reps}, same "
        f"process. The same tab data from both forms: {'yes' if same else '**NO**'}. *JSON*: the `/run` answer.",
        "- *page*: TensorBoard on the run, headless Chromium navigated to `#lightning_bn`, seconds until the tab's "
        f"status line says every layer is drawn; *first*: the first load after TensorBoard started (the plugin builds "
        f"the run's data), *then*: median of the {args.loads} loads after it (the plugin's cached JSON); *first, "
        f"{args.settle:.0f} s after start*: the first load of another TensorBoard, navigated {args.settle:.0f} s after "
        "it first answered (the plugin prepares the tab's first run when TensorBoard starts: a user who opens the "
        "tab a few seconds later gets it built). Page figures include TensorBoard's own page (about 1 s of the "
        "*then* loads here); *tab draw ms*: median over the *then* loads of the milliseconds the tab itself "
        "spent drawing the rows once its JSON was parsed (`body.dataset.timing`).",
        "- *before*: measured the same way at commit 67f43be, before issue #25's work (the machine as above, at a "
        "load average near 3; its run_data best of 3), kept as numbers: the *after* figures come from this run at the "
        "load above, so compare with care. The first (cold) page load varies most: it competes for the 2 cores with "
        "TensorBoard's own start (loading the event file) and Chromium's. "
        + ("" if standard else "Only for 1,000 steps x 61 layers: not shown for this size."),
        "",
        "| form | bytes / step before | after | tab data s before | after | JSON MB before | after "
        "| page first s before | then s before | page first s after | then s after | tab draw ms after "
        f"| first, {args.settle:.0f} s after start, s after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "| form | event file MB | scalar tags | write s | layers x steps shown |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {form} | {r['bytes'] / 1e6:.2f} | {r['tags']} | {r['written_s']:.1f} | {r['layers']} x {r['steps']} |"
            for form, r in results.items()
        ),
        "",
        f"compact / per-layer: bytes {b['per_step'] / a['per_step']:.3f}x, "
        f"tab data {b['build_s'] / a['build_s']:.3f}x.",
    ]
    args.output.write_text("\n".join(text) + "\n")
    print("\n".join(text))


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s" if values else "no more loads"


if __name__ == "__main__":
    main()
