"""The lightning-bn tab of TensorBoard (lightning_bn/tb_plugin): its routes through werkzeug's test client, and the
tab itself in headless Chromium (like tests/test_browser.py) on a run where one ReLU is killed at a known step."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from tests.test_browser import browser_binary  # noqa: F401  (the fixture: skips with the reason without Chromium)

#: installed in every document (TensorBoard's page and the tab's iframe): collects console errors, uncaught errors
#: (scripts, failed loads of scripts and stylesheets) and unhandled rejections into window.__lbnErrors
_COLLECT_ERRORS = """
window.__lbnErrors = [];
const __lbnError = console.error.bind(console);
console.error = (...args) => { window.__lbnErrors.push(args.map(String).join(' ')); __lbnError(...args); };
window.addEventListener('error', (e) => window.__lbnErrors.push(
  e.message || ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || '?'))), true);
window.addEventListener('unhandledrejection', (e) => window.__lbnErrors.push('unhandled: ' + e.reason));
"""

KILL_STEP = 10
#: the ReLU killed at KILL_STEP (its Linear, net.2, gets a bias of -1e3 there) and the layers' forward order
KILLED = "net.3"
ORDER = ["net.0", "net.1", "net.2", "net.3", "net.4", "net.5", "net.6"]


def _killed_run(tmp_path):
    """A ReLU MLP trained 20 steps (monitors every 2 steps) whose second ReLU is dead from step KILL_STEP on."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn

    from lightning_bn import ActivationMonitor, GradientMonitor
    from tests.helpers import BoringClassifier, mlp, trainer

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == KILL_STEP:
                with torch.no_grad():
                    module.net[2].bias.fill_(-1e3)

    torch.manual_seed(0)
    logdir = tmp_path / "logs"
    callbacks = [ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2), Kill()]
    trainer(tmp_path, logger=TensorBoardLogger(logdir, name="mlp"), callbacks=callbacks, max_steps=20).fit(
        BoringClassifier(mlp(3, 32, nn.ReLU))
    )
    return logdir


@pytest.fixture(scope="module")
def killed_logdir(tmp_path_factory):
    return _killed_run(tmp_path_factory.mktemp("tb_plugin"))


def _blocks_run(logdir):
    """A short run of a model with numbered blocks (net.1.*, net.2.*) between two ungrouped Linears."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn

    from lightning_bn import ActivationMonitor, GradientMonitor
    from tests.helpers import BoringClassifier, trainer

    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Linear(32, 32), nn.ReLU())  # noqa: E731
    net = nn.Sequential(nn.Linear(64, 32), block(), block(), nn.Linear(32, 10))
    callbacks = [ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2)]
    logger = TensorBoardLogger(logdir, name="zblocks")
    trainer(logdir.parent, logger=logger, callbacks=callbacks, max_steps=6).fit(BoringClassifier(net))


def _client(logdir):
    """The plugin on ``logdir`` and a werkzeug test client of its routes (as TensorBoard mounts them)."""
    from tensorboard.plugins import base_plugin
    from werkzeug import Response
    from werkzeug.test import Client

    from lightning_bn.tb_plugin import LightningBNPlugin

    plugin = LightningBNPlugin(base_plugin.TBContext(logdir=str(logdir)))
    apps = plugin.get_plugin_apps()

    def dispatch(environ, start_response):
        route = apps.get(environ.get("PATH_INFO", ""), Response("not found", status=404))
        return route(environ, start_response)

    return plugin, Client(dispatch)


def test_short_names_drop_only_the_common_prefix():
    from lightning_bn.tb_plugin import short_names

    assert short_names(["model.enc.0.fc", "model.enc.1.fc", "model.head"], 8) == ["enc.0.fc", "enc.1.fc", "head"]
    assert short_names(["a.b.c", "a.b.c"], 0) == ["c", "c"]  # the last part is always kept
    assert short_names(["enc.0.x", "dec.0.x"], 0) == ["enc.0.x", "dec.0.x"]  # nothing common: never the middle
    assert short_names(["net.0", "net.1"]) == ["net.0", "net.1"]  # short names stay whole


def test_block_of_is_the_prefix_up_to_the_first_block_number():
    from lightning_bn.tb_plugin import block_of

    assert block_of("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.3."
    assert block_of("net.1.0") == "net.1."
    assert block_of("net.3") is None and block_of("head") is None  # a number that is the last part is no block


def test_routes_give_layers_in_forward_order_and_the_flag_with_its_step(killed_logdir):
    plugin, client = _client(killed_logdir)
    assert plugin.is_active()
    assert plugin.frontend_metadata().es_module_path == "/index.js"

    runs = json.loads(client.get("/runs").get_data())["runs"]
    assert runs == ["mlp/version_0"]
    response = client.get("/run", query_string={"run": runs[0]})
    assert response.status_code == 200
    data = json.loads(response.get_data())

    assert [layer["name"] for layer in data["layers"]] == ORDER
    assert data["forward_order"] is True
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["net.0"]["module_type"] == "Linear" and by_name["net.1"]["activation"] == "relu"
    assert [layer["short"] for layer in data["layers"]] == ORDER  # short enough to stay whole
    dead = {flag["name"]: flag for flag in by_name[KILLED]["flags"]}["dead"]
    assert dead["first_step"] == KILL_STEP and dead["active"]
    assert by_name[KILLED]["first_flagged"] <= KILL_STEP
    assert not by_name["net.1"]["flags"] and not by_name["net.5"]["flags"]

    steps = data["steps"]
    assert steps == sorted(steps) and KILL_STEP in steps
    assert {"std_ratio", "saturation", "dead", "grad_ratio", "transmission", "update_ratio", "kurtosis"} <= set(
        data["figures"]
    )
    assert data["figures"]["transmission"]["scale"] == "transmission"
    assert data["figures"]["kurtosis"]["scale"] == "kurtosis"
    relu_transmission = data["figures"]["transmission"]["values"][ORDER.index("net.1")]
    assert any(value is not None and 0.5 < value < 2 for value in relu_transmission)
    update_row = data["figures"]["update_ratio"]["values"][ORDER.index("net.0")]
    assert any(value is not None and value > 0 for value in update_row)
    kurtosis_row = data["figures"]["kurtosis"]["values"][ORDER.index("net.0")]
    assert any(value is not None and value >= 1 for value in kurtosis_row)  # Pearson's kurtosis is >= 1
    assert all(layer["group"] is None for layer in data["layers"])  # net.0 .. net.6: no blocks
    dead_row = data["figures"]["dead"]["values"][ORDER.index(KILLED)]
    assert len(dead_row) == len(steps)
    assert dead_row[steps.index(KILL_STEP)] == 1.0 and dead_row[0] < 0.5
    grad_row = data["figures"]["grad_ratio"]["values"][ORDER.index("net.0")]
    assert any(value is not None and value > 0 for value in grad_row)
    assert data["figures"]["std_ratio"]["values"][0][0] == pytest.approx(1.0)  # the first Linear is its own reference
    # a dead ReLU outputs exactly 0: its std ratio is sent as 0 (the tab draws it on the log axis's floor), not null
    killed_std = data["figures"]["std_ratio"]["values"][ORDER.index(KILLED)]
    assert killed_std[steps.index(KILL_STEP)] == 0.0
    assert all(len(repr(v)) <= 11 for row in data["figures"]["update_ratio"]["values"] for v in row)  # 4 digits

    assert client.get("/run", query_string={"run": "../.."}).status_code == 404  # nothing outside the logdir
    js = client.get("/index.js")
    assert js.status_code == 200 and b"export async function render" in js.get_data()
    assert "javascript" in js.headers["Content-Type"]
    assert client.get("/style.css").status_code == 200


def test_is_active_scans_the_logdir_at_most_every_few_seconds(tmp_path, killed_logdir, monkeypatch):
    import shutil

    from lightning_bn.tb_plugin import plugin as module

    scans = []
    list_runs = module.list_runs
    main = threading.current_thread()  # the scans of is_active itself, not those of the prefetch it starts

    def counted(logdir):
        if threading.current_thread() is main:
            scans.append(logdir)
        return list_runs(logdir)

    monkeypatch.setattr(module, "list_runs", counted)
    plugin, _ = _client(tmp_path)
    assert not plugin.is_active() and not plugin.is_active()
    assert len(scans) == 1  # an empty directory: not scanned again within RESCAN_S
    shutil.copytree(killed_logdir, tmp_path / "later")
    assert not plugin.is_active()
    plugin._scanned -= module.RESCAN_S  # RESCAN_S later
    assert plugin.is_active() and plugin.is_active() and len(scans) == 2  # a positive answer is kept


def test_the_plugin_is_an_installed_entry_point():
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="tensorboard_plugins") if e.name == "lightning_bn"]
    if not found:
        pytest.skip("lightning-bn is not installed (pip install -e .): TensorBoard cannot find the tab")
    from lightning_bn.tb_plugin.plugin import LightningBNPlugin

    assert found[0].load() is LightningBNPlugin


@pytest.mark.slow
def test_tab_in_tensorboard_shows_rows_in_forward_order_and_the_flag(
    killed_logdir,
    tmp_path,
    browser_binary,  # noqa: F811
):
    from importlib.metadata import entry_points

    from lightning_bn.tb_plugin import run_data
    from tests.test_browser import Chromium, tensorboard_server

    if not any(e.name == "lightning_bn" for e in entry_points(group="tensorboard_plugins")):
        pytest.skip("lightning-bn is not installed (pip install -e .): TensorBoard cannot find the tab")
    import shutil

    logdir = tmp_path / "logs"
    shutil.copytree(killed_logdir, logdir)
    _blocks_run(logdir)
    started = time.monotonic()
    with tensorboard_server(logdir) as url, Chromium(browser_binary) as browser:
        browser.page("Page.enable")
        browser.page("Page.addScriptToEvaluateOnNewDocument", source=_COLLECT_ERRORS)
        browser.goto(f"{url}/?darkMode=false#lightning_bn")
        frame = (
            "(() => { const f = document.querySelector('iframe'); "
            "return f && f.contentDocument && f.contentDocument.body; })()"
        )
        deadline = time.monotonic() + 30
        rows = None
        while time.monotonic() < deadline:
            rows = browser.evaluate(
                f"(() => {{ const b = {frame}; if (!b || !b.dataset.loaded) return null; "
                "return JSON.stringify([...b.querySelectorAll('.row')].map((r) => [r.dataset.layer, "
                "[...r.querySelectorAll('.flag')].map((f) => [f.dataset.flag, f.dataset.firstStep]), "
                "r.querySelectorAll('canvas.strip').length])); })()"
            )
            if rows:
                break
            time.sleep(0.25)
        assert rows, f"the lightning-bn tab did not render its rows: {browser.text()[-2000:]}"
        load_s = time.monotonic() - started
        rows = json.loads(rows)
        assert [name for name, _, _ in rows] == ORDER
        flags = {name: dict(map(tuple, flags)) for name, flags, _ in rows}
        assert flags[KILLED].get("dead") == str(KILL_STEP)
        assert all(strips >= 7 for _, _, strips in rows)
        legends = json.loads(
            browser.evaluate(f"JSON.stringify([...{frame}.querySelectorAll('.legend')].map((l) => l.dataset.figure))")
        )
        assert {"std_ratio", "grad_ratio", "transmission", "update_ratio", "kurtosis"} <= set(legends)
        for key in ("transmission", "update_ratio", "kurtosis"):
            assert browser.evaluate(f"{frame}.querySelectorAll('canvas.strip[data-figure={key}]').length") == len(ORDER)
        marks = browser.evaluate(f"{frame}.querySelectorAll('.legend .legend-mark').length")
        # transmission's 1 (healthy), kurtosis's 3 and the output log Z's 0 (the MLP's cross-entropy head)
        assert "out_log_z" in legends and marks == 3
        assert browser.evaluate(f"{frame}.querySelectorAll('.group').length") == 0  # no blocks in this run

        # sort by first flagged: the killed layer comes first; the filter keeps only matching rows
        browser.evaluate(
            f"(() => {{ const b = {frame}; const s = b.querySelector('#sort'); s.value = 'flagged'; "
            "s.dispatchEvent(new Event('change')); })()"
        )
        first = browser.evaluate(f"{frame}.querySelector('.row').dataset.layer")
        flagged = [name for name in ORDER if flags[name]]
        assert first in flagged and first == min(
            flagged, key=lambda n: (min(map(int, flags[n].values())), ORDER.index(n))
        )
        browser.evaluate(
            f"(() => {{ const b = {frame}; const i = b.querySelector('#filter'); i.value = 'dead'; "
            "i.dispatchEvent(new Event('input')); })()"
        )
        filtered = json.loads(
            browser.evaluate(f"JSON.stringify([...{frame}.querySelectorAll('.row')].map((r) => r.dataset.layer))")
        )
        assert KILLED in filtered and set(filtered) == {n for n in ORDER if "dead" in flags[n]}
        browser.evaluate(
            f"(() => {{ const b = {frame}; const i = b.querySelector('#filter'); i.value = ''; "
            "i.dispatchEvent(new Event('input')); const s = b.querySelector('#sort'); s.value = 'forward'; "
            "s.dispatchEvent(new Event('change')); })()"
        )
        # hover over the killed layer's dead-fraction strip at the kill step: the tooltip gives value and step
        box = json.loads(
            browser.evaluate(
                f"(() => {{ const b = {frame}; const view = b.ownerDocument.defaultView; "
                "const f = view.frameElement.getBoundingClientRect(); "
                f"const c = b.querySelector('.row[data-layer=\\'{KILLED}\\'] canvas.strip[data-figure=dead]')"
                ".getBoundingClientRect(); "
                "return JSON.stringify([f.left + c.left, f.top + c.top, c.width, c.height]); })()"
            )
        )
        logged = run_data(killed_logdir / "mlp" / "version_0")["steps"]
        x = box[0] + (logged.index(KILL_STEP) + 0.5) * box[2] / len(logged)
        y = box[1] + box[3] / 2
        browser.page("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        tip = browser.evaluate(f"{frame}.querySelector('.tooltip').textContent")
        assert tip == f"{KILLED} · dead fraction = 1.00 at step {KILL_STEP}", tip
        # a click on a row opens its curves, one line chart per figure; a second click closes them
        click_row = f"{frame}.querySelector('.row[data-layer=\\'{KILLED}\\'] .name').click()"
        browser.evaluate(click_row)
        charts = json.loads(
            browser.evaluate(
                f"JSON.stringify([...{frame}.querySelectorAll('.curves[data-layer=\\'{KILLED}\\'] svg.curve')]"
                ".map((c) => [c.dataset.figure, c.querySelectorAll('polyline').length]))"
            )
        )
        assert [key for key, _ in charts] == list(run_data(killed_logdir / "mlp" / "version_0")["figures"])
        assert dict(charts)["dead"] == 1 and dict(charts)["kurtosis"] == 1
        # its std ratio is 0 once dead: drawn on a floor line of the log axis (ticked 0), which the label announces
        floor = json.loads(
            browser.evaluate(
                f"(() => {{ const c = {frame}.querySelector("
                f"'.curves[data-layer=\\'{KILLED}\\'] svg.curve[data-figure=std_ratio]'); "
                "return JSON.stringify([c.dataset.zeroFloor, c.querySelector('.curve-label').textContent, "
                "c.querySelectorAll('line.curve-floor').length, [...c.querySelectorAll('.curve-tick')]"
                ".map((t) => t.textContent)]); })()"
            )
        )
        assert floor[0] is not None and "0 on the floor" in floor[1] and floor[2] == 1 and "0" in floor[3], floor
        assert browser.evaluate(f"{frame}.dataset.ready") == "1"
        browser.screenshot("/tmp/lightning_bn_tab.png")
        browser.evaluate(click_row)
        assert browser.evaluate(f"{frame}.querySelectorAll('.curves').length") == 0

        # a run with numbered blocks: its rows grouped under one header per block; a click collapses, another expands
        browser.evaluate(
            f"(() => {{ const b = {frame}; b.dataset.loaded = ''; const s = b.querySelector('#run'); "
            "s.value = 'zblocks/version_0'; s.dispatchEvent(new Event('change')); })()"
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and browser.evaluate(f"{frame}.dataset.loaded") != "zblocks/version_0":
            time.sleep(0.2)
        layout = lambda: json.loads(  # noqa: E731
            browser.evaluate(
                f"JSON.stringify([...{frame}.querySelectorAll('.group, .row')].map((r) => "
                "r.classList.contains('group') ? 'group ' + r.dataset.group : r.dataset.layer))"
            )
        )
        assert layout() == [
            "net.0",
            "group net.1.",
            "net.1.0",
            "net.1.1",
            "group net.2.",
            "net.2.0",
            "net.2.1",
            "net.3",
        ]
        browser.evaluate(f"{frame}.querySelector('.group[data-group=\\'net.1.\\']').click()")
        assert layout() == ["net.0", "group net.1.", "group net.2.", "net.2.0", "net.2.1", "net.3"]
        browser.evaluate(f"{frame}.querySelector('.group[data-group=\\'net.1.\\']').click()")
        assert layout()[2:4] == ["net.1.0", "net.1.1"]

        errors = json.loads(
            browser.evaluate(
                f"JSON.stringify([...window.__lbnErrors, ...{frame}.ownerDocument.defaultView.__lbnErrors])"
            )
        )
        assert not errors, errors
        styled = browser.evaluate(f"getComputedStyle({frame}.querySelector('.row')).display")
        assert styled == "contents", "the tab's stylesheet did not load"
    print(f"lightning-bn tab rendered {load_s:.1f} s after TensorBoard was started")
