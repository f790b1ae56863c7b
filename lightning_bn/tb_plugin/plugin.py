"""The TensorBoard side of the lightning-bn tab: a dynamic plugin (entry point ``tensorboard_plugins``) whose frontend
is a plain ES module and a stylesheet served from ``static/``, and whose routes answer JSON from :mod:`.data`."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .data import list_runs, resolve_run, run_data

__all__ = ["PLUGIN_NAME", "LightningBNPlugin"]

PLUGIN_NAME = "lightning_bn"
_STATIC = Path(__file__).resolve().parent / "static"
#: seconds between two scans of the log directory while it holds no run
RESCAN_S = 5.0
_ASSETS = {"/index.js": ("index.js", "text/javascript"), "/style.css": ("style.css", "text/css")}


def _json(payload: Any, status: int = 200) -> wrappers.Response:
    def clean(value: Any) -> Any:  # JSON has no inf/NaN
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    try:  # run_data's matrices are already clean: the walk is only for what is not
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(clean(payload), allow_nan=False, separators=(",", ":"))
    return wrappers.Response(text, status=status, content_type="application/json")


class LightningBNPlugin(base_plugin.TBPlugin):
    """The lightning-bn tab: per watched layer, in forward order, strips of its figures over the logged steps and the
    report's flags (:func:`lightning_bn.report.analyze` of the run)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = Path(os.path.expanduser(context.logdir)) if context.logdir else None
        self._cache: dict[str, tuple[Any, bytes]] = {}
        self._lock = threading.Lock()
        self._building: dict[tuple[str, Any], Future[bytes]] = {}
        self._active = False
        self._scanned = -math.inf
        if self._logdir is not None:  # TensorBoard starts: the tab's first run is built before anyone opens it
            self._prefetch()

    def is_active(self) -> bool:
        """Whether the log directory holds a run: once it does, always (runs are not taken away while TensorBoard
        serves them); until then the directory is scanned at most once every :data:`RESCAN_S` seconds (TensorBoard
        asks on every plugins listing)."""
        if self._active or self._logdir is None:
            return self._active
        now = time.monotonic()
        if now - self._scanned >= RESCAN_S:
            self._scanned = now
            self._active = bool(list_runs(self._logdir))
            if self._active:  # the first run may be new since TensorBoard started: built while the page loads
                self._prefetch()
        return self._active

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="lightning-bn", disable_reload=True)

    def get_plugin_apps(self) -> dict[str, Any]:
        apps: dict[str, Any] = {route: self._static(*asset) for route, asset in _ASSETS.items()}
        apps["/runs"] = self._serve_runs
        apps["/run"] = self._serve_run
        return apps

    @staticmethod
    def _static(filename: str, mimetype: str) -> Any:
        @wrappers.Request.application
        def serve(request: wrappers.Request) -> wrappers.Response:
            return wrappers.Response((_STATIC / filename).read_bytes(), content_type=f"{mimetype}; charset=utf-8")

        return serve

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        return _json({"runs": list_runs(self._logdir) if self._logdir is not None else []})

    @wrappers.Request.application
    def _serve_run(self, request: wrappers.Request) -> wrappers.Response:
        name = request.args.get("run", "")
        path = resolve_run(self._logdir, name) if self._logdir is not None else None
        if path is None:
            return _json({"error": f"no run {name!r}"}, status=404)
        return wrappers.Response(self._encoded(name, path), content_type="application/json")

    def _encoded(self, name: str, path: Path) -> bytes:
        """The ``/run`` JSON of run ``name``, built once per version of its event files; a request that comes while
        it is being built (by the prefetch or another request) waits for that build."""
        files = sorted(path.glob("events.out.tfevents.*"))
        key = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            build = self._building.get((name, key))
            owner = build is None
            if owner:
                build = self._building[(name, key)] = Future()
        if not owner:
            return build.result()
        try:
            encoded = _json(run_data(path, name)).get_data()
        except BaseException as err:
            build.set_exception(err)
            raise
        finally:
            with self._lock:
                self._building.pop((name, key), None)
        with self._lock:
            self._cache[name] = (key, encoded)
        build.set_result(encoded)
        return encoded

    def _prefetch(self) -> None:
        """Build the JSON of the run the tab opens first (the first of ``/runs``) in a background thread: when
        TensorBoard starts, and when :meth:`is_active` first finds a run (TensorBoard asks it as its page loads, so
        the data is built while the page and the tab's frame load). Already built: nothing is done again."""

        def build() -> None:
            try:
                runs = list_runs(self._logdir)
                path = resolve_run(self._logdir, runs[0]) if runs else None
                if path is not None:
                    self._encoded(runs[0], path)
            except Exception:  # noqa: BLE001  (a request for the run builds it again and answers the error)
                pass

        threading.Thread(target=build, name="lightning-bn-prefetch", daemon=True).start()
