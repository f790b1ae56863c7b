"""The TensorBoard side of the lightning-bn tab: a dynamic plugin (entry point ``tensorboard_plugins``) whose frontend
is a plain ES module and a stylesheet served from ``static/``, and whose routes answer JSON from :mod:`.data`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .data import list_runs, resolve_run, run_data

__all__ = ["PLUGIN_NAME", "LightningBNPlugin"]

PLUGIN_NAME = "lightning_bn"
_STATIC = Path(__file__).resolve().parent / "static"
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

    return wrappers.Response(
        json.dumps(clean(payload), allow_nan=False), status=status, content_type="application/json"
    )


class LightningBNPlugin(base_plugin.TBPlugin):
    """The lightning-bn tab: per watched layer, in forward order, strips of its figures over the logged steps and the
    report's flags (:func:`lightning_bn.report.analyze` of the run)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = Path(os.path.expanduser(context.logdir)) if context.logdir else None
        self._cache: dict[str, tuple[Any, dict[str, Any]]] = {}

    def is_active(self) -> bool:
        return self._logdir is not None and bool(list_runs(self._logdir))

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
        files = sorted(path.glob("events.out.tfevents.*"))
        key = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        cached = self._cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, run_data(path, name))
            self._cache[name] = cached
        return _json(cached[1])
