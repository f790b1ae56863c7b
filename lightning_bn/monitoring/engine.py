"""The one monitoring engine: everything :class:`~lightning_bn.Monitor`, :class:`~lightning_bn.ActivationMonitor` and
:class:`~lightning_bn.GradientMonitor` do, in plain PyTorch; the drivers only say when a step begins and ends and where
its figures go.

A driver calls, per optimizer step: :meth:`MonitorEngine.begin` before the step's first forward pass,
:meth:`~MonitorEngine.watch_nonfinite` and :meth:`~MonitorEngine.measure_gradients` once the gradients are there, and
:meth:`~MonitorEngine.end` after the optimizer step. On steps that do not log the cost is an integer comparison (and,
with ``nonfinite_every_step``, one fused norm over the gradients on the device, no host sync).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn import checks
from lightning_bn.checks import user_stacklevel
from lightning_bn.monitoring import rows as _rows
from lightning_bn.monitoring.activation import ActivationProbe, layer_entry
from lightning_bn.monitoring.attention import AttentionProbe
from lightning_bn.monitoring.gradients import GradientProbe, dense_values, local
from lightning_bn.monitoring.rows import BACKENDS, COMPILE_SECONDS, DEFAULT_ZERO_TOL
from lightning_bn.monitoring.select import (
    ForwardOrder,
    ModuleFilter,
    WatchTarget,
    plain_names,
    scripted_modules,
    unwrap,
    validate_module_filter,
    watch_targets,
)
from lightning_bn.tags import (
    ACT_SATURATION,
    ACTIVATION_HISTOGRAMS,
    ACTIVATION_SECTION,
    GRAD_NORM,
    GRAD_RMS_EPS,
    GRADIENT_HISTOGRAMS,
    GRADIENT_SECTION,
    LAYOUT_STATISTICS,
    LOSS_TAG,
    SKIPPED_STEPS_TAG,
    TOTAL_GRADIENT_TAG,
    UPDATE_RATIO,
    WEIGHT_NORM,
    layer_order,
    split_tag,
)
from lightning_bn.tracing import ActivationSite, ModelMap, trace_call, trace_model

__all__ = ["HISTORY", "MonitorEngine", "MonitorOptions", "StepResult", "is_rank_zero"]

#: logged steps of each figure the engine keeps on the host (for HealthCheck, the heatmap, ``Monitor.figures``)
HISTORY = 1000


@dataclass(frozen=True)
class MonitorOptions:
    """Every option of the monitors, checked once, the same for :class:`~lightning_bn.Monitor`,
    :class:`~lightning_bn.ActivationMonitor` and :class:`~lightning_bn.GradientMonitor`.

    Args:
        every_n_steps: log on optimizer steps that are multiples of this (step 0, the init, included).
        activations: watch activations (``act_*`` figures).
        gradients: watch parameters (``grad_norm``, ``weight_norm``, ``update_ratio``).
        modules: which modules' activations to watch: module types, glob patterns on qualified names
            (``"encoder.*"``, also matching activation sites such as ``"fc1.relu"``), or a predicate
            ``(name, module) -> bool``. Default: every activation and every leaf layer with a weight.
        histograms: a histogram per watched activation (TensorBoard only; rank-local under DDP).
        gradient_histograms: a histogram per gradient (TensorBoard only).
        histogram_bins: bins per histogram.
        heatmap: an image of saturation per activation layer over the logged steps (TensorBoard only).
        zero_tol: ``|x|`` at or below this counts towards ``act_zero``.
        fused: how the one fused pass per watched tensor runs: ``"auto"``, ``"compiled"`` or ``"eager"``
            (:mod:`lightning_bn.monitoring.rows`).
        norm_type: the p of the gradient and weight p-norms (``float("inf")`` allowed).
        update_ratio: ``True`` (a sampled copy of the weights within ``update_ratio_budget``), ``"all"`` (exact)
            or ``False``.
        update_ratio_budget: fraction of each large parameter's elements copied on a logging step.
        nonfinite_every_step: watch every step for non-finite gradients (on the device, no host sync); ``False``:
            on logging steps only.
        per_layer_scalars: ``False`` (default): TensorBoard gets a logging step's per-layer figures as one compact
            record (``lightning_bn/rows``, :mod:`lightning_bn.writers`; the lightning-bn tab, the report, ``analyze``
            and ``plot`` read it) and scalars for the model-wide figures only; ``True``: a TensorBoard scalar per
            figure and layer as well. Other loggers (CSV, W&B, ...) always get every scalar.
        attention: with ``activations``, figures of every attention call the trace found (one row per attention
            layer: ``attn_logit_max``, ``attn_logit_rms``, ``attn_entropy``, ``attn_entropy_min``) and of the output
            logits where the loss is a cross-entropy (``out_logit_max``, ``out_log_z``), on logging steps only
            (:mod:`lightning_bn.monitoring.attention`); nothing for a model with neither.

    Raises:
        ValueError: naming the option and the bad value.

    Example::

        >>> MonitorOptions(every_n_steps=10).every_n_steps
        10
        >>> MonitorOptions(histogram_bins=-5)
        Traceback (most recent call last):
        ...
        ValueError: Expected `histogram_bins` to be an integer >= 1 but got -5
    """

    every_n_steps: int = 50
    activations: bool = True
    gradients: bool = True
    modules: ModuleFilter = None
    histograms: bool = True
    gradient_histograms: bool = False
    histogram_bins: int = 64
    heatmap: bool = True
    zero_tol: float = DEFAULT_ZERO_TOL
    fused: str = "auto"
    norm_type: float = 2.0
    update_ratio: bool | str = True
    update_ratio_budget: float = 0.25
    nonfinite_every_step: bool = True
    per_layer_scalars: bool = False
    attention: bool = True

    def __post_init__(self) -> None:
        checks.integer("every_n_steps", self.every_n_steps)
        for name in ("activations", "gradients", "histograms", "gradient_histograms", "heatmap",
                     "nonfinite_every_step", "per_layer_scalars", "attention"):  # fmt: skip
            checks.boolean(name, getattr(self, name))
        validate_module_filter(self.modules)
        checks.integer("histogram_bins", self.histogram_bins)
        object.__setattr__(self, "zero_tol", checks.number("zero_tol", self.zero_tol, 0.0, strict=False))
        checks.choice("fused", self.fused, BACKENDS)
        object.__setattr__(self, "norm_type", checks.number("norm_type", self.norm_type, allow_inf=True))
        object.__setattr__(self, "update_ratio", checks.choice("update_ratio", self.update_ratio, (True, False, "all")))
        budget = checks.fraction("update_ratio_budget", self.update_ratio_budget, open_low=True)
        object.__setattr__(self, "update_ratio_budget", budget)
        if not (self.activations or self.gradients):
            raise ValueError("Expected `activations` or `gradients` to be True but got False for both")

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in order."""
        return [f.name for f in fields(cls)]


@dataclass
class StepResult:
    """The figures of one logging step, on the host: ``metrics`` (tag -> value, as logged) and histograms as
    ``(tag prefix, records)`` pairs for the writers."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    histograms: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)


def is_rank_zero() -> bool:
    """Whether this process is rank zero of the default process group (or there is none)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_compiled(module: object) -> bool:
    """Whether ``module`` runs through torch.compile: ``torch.compile(module)`` (an ``OptimizedModule``, a private
    path), ``module.compile()`` in place, or a LightningModule ``trainer.fit(torch.compile(model))`` unwrapped
    (Lightning's ``from_compiled`` keeps the compiled forward and steps in ``_compiler_ctx``)."""
    if type(module).__name__ == "OptimizedModule":  # torch._dynamo.eval_frame.OptimizedModule
        return True
    state = getattr(module, "__dict__", {})
    return state.get("_compiled_call_impl") is not None or state.get("_compiler_ctx") is not None


#: the holders (engines, by id) that need torch.compile'd code to run eagerly now, and the stance to restore
_eager_holders: set[int] = set()
_eager_stance: list[Any] = []


def _run_eagerly(holder: object, on: bool) -> None:
    """While some holder asks (a logging step of a compiled model), torch.compile'd code runs eagerly
    (``torch.compiler.set_stance("force_eager")``; the previous stance comes back when the last holder lets go).

    Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``): a graph compiled while no hook was on
    would silently skip the monitor's hooks, and guarding on them would recompile at every attach and detach (and
    log it, up to the recompile limit). Running the logging step eagerly measures every layer, breaks no graph and
    recompiles nothing; the other steps keep the compiled code."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:  # torch < 2.6
        return
    key = id(holder)
    if on and key not in _eager_holders:
        _eager_holders.add(key)
        if len(_eager_holders) == 1:
            _eager_stance.append(stance("force_eager"))  # set now; its __exit__ restores the stance before it
    elif not on and key in _eager_holders:
        _eager_holders.discard(key)
        if not _eager_holders and _eager_stance:
            _eager_stance.pop().__exit__(None, None, None)
    _rows.eager_stance_held = bool(_eager_holders)


class MonitorEngine:
    """Per-layer activation and gradient figures of one model, driven step by step.

    Args:
        options: what to measure and when (:class:`MonitorOptions`).
        owner: the name messages give (the driver's class name).
        warn: how a warning reaches the user (``warnings.warn`` by default; the callbacks pass ``rank_zero_warn``).
        info: how a notice reaches the user (``None``: dropped).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> engine = MonitorEngine(MonitorOptions(every_n_steps=2))
        >>> engine.start(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> for step in range(3):
        ...     _ = engine.begin(step, snapshot=True)
        ...     opt.zero_grad()
        ...     net(torch.randn(16, 4)).pow(2).mean().backward()
        ...     opt.step()
        ...     engine.watch_nonfinite(step)
        ...     engine.measure_gradients(step)
        ...     result = engine.end()
        >>> [s for s, _ in engine.figures["act_std/1"]], result.step
        ([0, 2], 2)
        >>> engine.close()
    """

    def __init__(
        self,
        options: MonitorOptions,
        owner: str = "Monitor",
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(options, MonitorOptions):
            raise ValueError(f"Expected `options` to be a MonitorOptions but got {options!r}")
        self.options = options
        self.owner = owner
        self._warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel()))
        self._info = info or (lambda message: None)
        #: every figure logged: tag -> the latest :data:`HISTORY` ``(step, value)`` pairs
        self.figures: dict[str, deque[tuple[int, float]]] = {}
        #: the trace of the model, once known
        self.model_map: ModelMap | None = None
        #: the watched layers in forward order (the layers table the report reads), once known
        self.layers: list[dict[str, Any]] | None = None
        #: the last step whose figures were collected (-1: none yet)
        self.last_logged_step = -1
        #: the latest logged saturation per activation layer: ``[(step, {layer: saturation})]``
        self.saturation: list[tuple[int, dict[str, float]]] = []
        self.warned_nonfinite = False
        self.closed = False
        self._model: nn.Module | None = None
        self._plain: Callable[[str], str] = str
        self._probe: ActivationProbe | None = None
        self._attention: AttentionProbe | None = None
        self._gradients: GradientProbe | None = None
        self._histogram_bins = 0
        self._entries: dict[str, tuple[nn.Module, Any]] = {}  # first-call traces not run yet: name -> (module, saved)
        self._order: ForwardOrder | None = None
        self._order_names: list[str] | None = None
        self._pending: int | None = None
        self._watched: list[Tensor] = []  # every parameter, in forward order: the non-finite watch
        self._eps: dict[Tensor, float] = {}  # parameters of Adam-type optimizers: their eps
        # on the device, since the last read: (first step, parameter index, count of the latest run of steps with
        # non-finite gradients, its length, the number of such steps); see watch_nonfinite
        self._window: Tensor | None = None
        #: optimizer steps not taken so far (non-finite gradients, weights still finite: a ``GradScaler`` skipping an
        #: overflow step), as of the latest logging step or epoch end; logged as
        #: :data:`~lightning_bn.tags.SKIPPED_STEPS_TAG` once there is one
        self.skipped_steps = 0
        self._index: tuple[tuple[int, ...], Tensor] | None = None
        self._compile_reported = False
        self._compiled_model = False  # a torch.compile'd model or part: its logging steps run eagerly
        self._named_unwatched: set[str] = set()  # activation sites and scripted modules named in a warning
        self._warned_new_parameters = False

    # ------------------------------------------------------------------------------------------------- set-up
    def start(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        tensorboard: bool = False,
        entries: Sequence[str] = ("",),
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        """Choose what to watch on ``model``: traced once on ``example_input`` when given, else on the first call of
        one of ``entries`` (qualified names of ``model`` and its submodules; ``""`` is the model), traced as it runs,
        once. Histograms are kept only with ``tensorboard`` (a writer that shows them). ``context`` wraps the example
        trace (a precision context).

        Raises:
            ValueError: when a ``modules`` entry matches nothing in the model.
        """
        self._check_open()
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}")
        self._model = model
        inner = unwrap(model)
        self._plain = plain_names(model)
        opts = self.options
        self._histogram_bins = opts.histogram_bins if tensorboard and opts.histograms else 0
        compiled = [self._plain(n) or type(model).__name__ for n, m in model.named_modules() if _is_compiled(m)]
        self._compiled_model = bool(compiled)
        if compiled and opts.activations:
            self._warn(
                f"{self.owner}: {compiled[0]!r} is torch.compile'd. Logging steps run it eagerly "
                "(torch.compiler.set_stance('force_eager')) so that the monitor's hooks see every layer: the figures "
                "stay exact, the other steps run compiled. Raise `every_n_steps` to keep compiled speed on most steps."
            )
        if opts.gradients:
            self._gradients = GradientProbe(
                [(self._plain(n), p) for n, p in model.named_parameters()],
                opts.norm_type,
                opts.update_ratio,
                opts.update_ratio_budget,
                opts.histogram_bins if tensorboard and opts.gradient_histograms else 0,
            )
        if not opts.activations:
            return
        scripted = scripted_modules(inner)
        if scripted:
            self._named_unwatched.update(scripted)
            self._warn(
                f"{self.owner}: {', '.join(map(repr, scripted))} {'is' if len(scripted) == 1 else 'are'} "
                "torch.jit scripted: no hook can go on a ScriptModule, so no layer inside is watched (its parameters "
                "are). Script the model after training, or watch the plain module."
            )
        if example_input is not None:
            found = None
            try:
                with context(), _eager_compiled():
                    found = trace_model(inner, example_input)
            except ValueError as err:
                self._trace_failed("its example input", err)
            self._build(found)
            return
        self._build(None)  # activation modules now; functional activations from the first call's trace
        names = dict(model.named_modules())
        for name in entries:
            module = unwrap(names[name]) if name in names else None
            if module is not None:
                self._entries[name] = (module, module.__dict__.get("forward"))
        for name, (module, _) in list(self._entries.items()):
            try:
                module.forward = self._traced_forward(name, module)
            except (AttributeError, TypeError, RuntimeError):  # e.g. a ScriptModule: its first call is not traced
                del self._entries[name]

    def layout(self) -> dict[str, tuple[str, ...]]:
        """The Custom Scalars sections this engine fills: title -> statistics charted (one chart each)."""
        sections = []
        if self.options.activations:
            sections.append(ACTIVATION_SECTION)
        if self.options.gradients:
            sections.append(GRADIENT_SECTION)
        return {title: LAYOUT_STATISTICS[title] for title in sections}

    def _trace_failed(self, where: str, err: BaseException | str) -> None:
        self._warn(
            f"{self.owner} could not trace {type(self._model).__name__} on {where} ({err}); it watches activation "
            "modules only, not functional activations."
        )

    def _targets(self, found: ModelMap | None) -> list[WatchTarget]:
        targets = watch_targets(unwrap(self._model), found, self.options.modules)
        if not targets:
            raise ValueError(f"Expected `modules={self.options.modules!r}` to select some module of the model")
        for target in targets:
            target.name = self._plain(target.name)
        return targets

    def _build(self, found: ModelMap | None, keep: Sequence[ActivationProbe] = ()) -> None:
        """The probe of the map ``found`` (``None``: activation modules only); ``keep``: probes whose rows of this
        step it takes over."""
        self.model_map = found
        opts = self.options
        targets = self._targets(found)
        probe = ActivationProbe(targets, self._histogram_bins, opts.zero_tol, opts.fused, training_only=True)
        was, self._probe = self._probe, probe
        if was is not None and was.attached:
            was.detach()
            probe.attach()
        probe.adopt(*keep)
        layers = [layer_entry(t) for t in probe.targets]
        if opts.attention:
            attention = AttentionProbe.of_map(unwrap(self._model), found, self._plain)
            was, self._attention = self._attention, attention
            if was is not None:
                attention.adopt(was)
            if was is not None and was.attached:
                running = was.capturing  # the model ran (a first call traced): the new probe's mode starts now
                was.detach()
                attention.attach()
                if running:
                    attention.start()
            elif was is not None:
                was.detach()
            layers = _with_attention(layers, attention, found, self._plain)
        self.layers = layers + self._unwatched(found)

    def _unwatched(self, found: ModelMap | None) -> list[dict[str, Any]]:
        """The layers-table rows of the activations the trace found and no hook can see (a ``silu`` in a plain
        function on tensors no module returns: HF Mamba's slow path), ``hook="unwatched"``; named in one warning."""
        rows = [{"name": self._plain(name), "module_type": None, "activation": None, "hook": "unwatched",
                 "reason": why} for name, why in (found.unwatchable if found is not None else [])]  # fmt: skip
        rows = list({row["name"]: row for row in rows}.values())
        new = [row["name"] for row in rows if row["name"] not in self._named_unwatched]
        if new:
            self._named_unwatched.update(new)
            self._warn(
                f"{self.owner}: {len(new)} activation call(s) are not watched: {', '.join(map(repr, new))} "
                f"({rows[0]['reason']}); their figures are missing from the report. Call the activation as a module "
                "(nn.SiLU()) or on the output of a module to have it watched."
            )
        return rows

    @property
    def unwatched(self) -> list[str]:
        """The activation sites the trace found and no hook can see (``?.silu``), and the scripted submodules."""
        return sorted(self._named_unwatched)

    def _traced_forward(self, name: str, module: nn.Module) -> Callable[..., Any]:
        original = type(module).forward.__get__(module) if self._entries[name][1] is None else self._entries[name][1]

        @torch.compiler.disable
        def forward(*args: Any, **kwargs: Any) -> Any:
            self._restore(name)
            if name == "":  # the whole model: its parts are traced inside it
                for other in list(self._entries):
                    self._restore(other)
            return self._trace_first_call(name, module, original, args, kwargs)

        return forward

    def _restore(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        module, saved = entry
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved

    def _trace_first_call(self, name: str, module: nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the first call of ``module`` once, traced as it runs; this very call is measured when it is part of
        a logging step (the probe's hooks see the modules, the trace the functional activations in between)."""
        measuring = self._pending is not None
        seen = ActivationProbe([], self._histogram_bins, self.options.zero_tol, self.options.fused, True)
        prefix = self._plain(self._name_of(module))

        def observe(site: ActivationSite, output: Tensor) -> None:
            if measuring:  # named as the probe built from the map will name it
                name = self._plain(f"{prefix}.{site.name}" if prefix else site.name)
                seen.record(WatchTarget(name, site.module, site.activation, site.hook, site.layout.unit_dim), output)

        probe = self._probe
        if probe is not None:
            probe.quiet = _quiet
        attention = self._attention.first_call(module) if measuring and self._attention else nullcontext()
        try:
            with _eager_compiled(), attention:
                output, found, failed = trace_call(module, original, args, kwargs, observe)
        finally:
            if probe is not None:
                probe.quiet = None
        if failed is not None or found is None:
            self._trace_failed("its first call", failed)
            return output
        if prefix:
            found = found.prefixed(prefix)
            if self.model_map is not None:
                found = self.model_map.merged(found)
        self._build(found, keep=[p for p in (probe, seen) if p is not None])
        return output

    def _name_of(self, module: nn.Module) -> str:
        return next((n for n, m in self._model.named_modules() if m is module), "")

    # ---------------------------------------------------------------------------------------------- the step
    def due(self, step: int) -> bool:
        """Whether ``step`` is a logging step not logged yet."""
        return step % self.options.every_n_steps == 0 and step != self.last_logged_step

    @property
    def pending(self) -> int | None:
        """The logging step begun and not ended yet, if any."""
        return self._pending

    def begin(self, step: int, snapshot: bool = False) -> bool:
        """Before the forward pass(es) of ``step``: on a logging step, the hooks go on (every training forward until
        :meth:`end` counts: all micro-batches of an accumulated step) and, with ``snapshot``, the weights are copied
        for the update ratio (a loop that measures gradients after ``optimizer.step()``). Whether ``step`` logs."""
        self._check_open()
        if self._pending == step:
            return True
        if not self.due(step):
            return False
        self._pending = step
        if self._probe is not None:
            self._probe.attach()
        if self._attention is not None:
            self._attention.attach()
        if self._gradients is not None:
            if self._order_names is None and (self.model_map is None or not self.options.activations):
                self._order = self._order or ForwardOrder(unwrap(self._model))
                self._order.attach()
            if snapshot:
                self._gradients.snapshot()
        if self._compiled_model and (self._probe is not None or self._order is not None or self._attention):
            _run_eagerly(self, True)  # hooks on a compiled model: see _run_eagerly
        return True

    def watch_nonfinite(self, step: int) -> None:
        """Every step (or on logging steps only), on the device, no host sync: keep the first step of the latest run of
        steps with a non-finite gradient, the first parameter in forward order that has one, the run's length and
        the number of such steps; read with the next logging transfer, judged by the weights then.

        Non-finite gradients followed by finite ones, or with finite weights at the read, are steps the optimizer did
        not take (a mixed-precision ``GradScaler`` skipping an overflow while its scale calibrates): counted in
        :attr:`skipped_steps`, never reported as non-finite. A step taken with inf/NaN gradients leaves inf/NaN
        weights, and their gradients stay non-finite from then on: reported (at the run's first step)."""
        if self._gradients is None or self.warned_nonfinite or not is_rank_zero():
            return  # DDP: gradients are identical on every rank; sharded: rank zero's shards
        if not self.options.nonfinite_every_step or self._pending is not None:
            return  # a logging step: its gradient norms tell (read with the step's transfer, in _take_gradients)
        self._watch_order()
        present = tuple(i for i, p in enumerate(self._watched) if p.grad is not None)
        if not present:
            return
        grads = [dense_values(self._watched[i].grad) for i in present]  # sparse: its values
        if self._index is None or self._index[0] != present:  # built once: no host-to-device copy per step
            self._index = (present, torch.tensor(present, device=grads[0].device))
        index = self._index[1]
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
        found = torch.stack([index[torch.argmax(bad.int())], bad.sum()])
        here = torch.cat([torch.full((1,), step, device=found.device), found])
        if self._window is None:
            self._window = torch.zeros(5, dtype=torch.long, device=found.device)
        window, any_bad = self._window, bad.any()
        self._window = torch.cat([
            torch.where(any_bad & (window[3] == 0), here, window[:3]),  # a run begins here
            torch.where(any_bad, window[3:4] + 1, 0),  # the run's length (0: the latest step was finite)
            window[4:5] + any_bad,  # steps with a non-finite gradient
        ])  # fmt: skip

    def _watch_payload(self) -> Tensor:
        """The watch's state and whether every weight is finite now (after an optimizer step), on the device."""
        weights = [local(p) for p in self._watched]
        norms = torch.stack(torch._foreach_norm(weights)).sum() if weights else torch.zeros(())
        return torch.cat([self._window, torch.isfinite(norms).to(self._window).reshape(1)])

    def _read_watch(self, values: list[float]) -> None:
        """Judge the steps watched since the last read by the weights after them (host values of the payload)."""
        step, index, count, run, steps, weights_finite = (int(v) for v in values)
        self._window = None
        if weights_finite or not run:  # every step with non-finite gradients was not taken
            self.skipped_steps += steps
            return
        self.skipped_steps += steps - run  # the latest run left non-finite weights: it began with a step taken
        self._report_nonfinite([step, index, count])

    def _watch_order(self) -> None:
        """The parameters in forward order of their layers (once): the first non-finite one is named."""
        if self._watched:
            return
        order = self._order_names or (self._order.names if self._order is not None else None)
        order = order or (self.model_map.order if self.model_map is not None else [])
        rank = {self._plain(name): i for i, name in enumerate(order)}
        named = sorted(self._gradients.names.items(), key=lambda item: rank.get(_module_of(item[1]), len(rank)))
        self._watched = [p for p, _ in named]

    def measure_gradients(
        self, step: int, params: Sequence[Tensor] | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """On a logging step, once the gradients are there: their norms (and the weights' copy for the update ratio,
        unless :meth:`begin` took one); ``params``: one optimizer's parameters (call once per optimizer). With the
        ``optimizer`` (Adam-type: its groups have ``eps`` and ``betas``), each parameter's per-element RMS gradient
        is also logged relative to ``eps`` (``grad_rms_eps``): below 1, Adam's step divides by ``eps`` rather than
        by the gradient's scale — a vanish that no comparison between layers can see when it hits them all."""
        if self._gradients is None or self._pending is None:
            return  # several optimizers (manual optimization) may each have advanced the step count
        if self._attention is not None:  # forward passes and loss done: the rest of the step runs without the mode
            self._attention.pause()
        if optimizer is not None and self.options.norm_type == 2:
            for group in optimizer.param_groups:
                if "eps" in group and "betas" in group and group["eps"] > 0:
                    self._eps.update({p: float(group["eps"]) for p in group["params"]})
        if not is_rank_zero() and not self._gradients.sharded:
            return  # plain parameters are identical on every rank after DDP's all-reduce: rank zero measures
        self._gradients.measure(self._pending, params)
        self._check_new_parameters()

    def _check_new_parameters(self) -> None:
        """Parameters added to the model after :meth:`start` are not measured: named once (on a logging step)."""
        if self._warned_new_parameters or self._model is None or not is_rank_zero():
            return
        known = self._gradients.names
        new = [self._plain(n) for n, p in self._model.named_parameters() if p.requires_grad and p not in known]
        if new:
            self._warned_new_parameters = True
            shown = ", ".join(map(repr, new[:5])) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            self._warn(
                f"{self.owner}: {len(new)} parameter(s) were added to the model after the monitor started and are "
                f"not measured: {shown}. Create the monitor once the model is complete."
            )

    def end(self, loss: Tensor | float | None = None) -> StepResult | None:
        """After the optimizer step of a logging step: the hooks come off, the rows are reduced across processes,
        and everything leaves the device in one transfer (``loss``, the step's training loss, with it: logged as
        :data:`~lightning_bn.tags.LOSS_TAG` when gradients are watched); the figures are kept in :attr:`figures` and
        returned. ``None`` when no logging step is pending. Every process must call it under data parallelism."""
        step, self._pending = self._pending, None
        _run_eagerly(self, False)
        if step is None:
            return None
        self.last_logged_step = step
        result = StepResult(step)
        parts: list[tuple[Tensor, Callable[[list[float]], None]]] = []
        if self._probe is not None:
            self._probe.detach()
            rows, parse = self._probe.gather()
            parts.append((rows, lambda host, parse=parse: self._take_activations(parse(host), result)))
        if self._attention is not None:
            self._attention.detach()
            rows, parse = self._attention.gather()
            parts.append((rows, lambda host, parse=parse: result.metrics.update(parse(host))))
        if self._order is not None:
            self._order.detach()
            self._order_names, self._order = [self._plain(n) for n in self._order.names], None
        self._restore_entries()
        watch = self._window is not None and is_rank_zero() and not self.warned_nonfinite
        if self._gradients is not None:
            payload = self._watch_payload() if watch else None
            gathered = self._gradients.gather([payload] if watch else [])
            if gathered is not None:
                norms, parse = gathered
                parts.append((norms, lambda host, parse=parse: self._take_gradients(parse(host), result, watch)))
            elif watch:
                parts.append((payload, self._read_watch))
            if isinstance(loss, Tensor) and loss.numel() == 1:
                parts.append((loss.detach().reshape(1), lambda host: result.metrics.__setitem__(LOSS_TAG, host[0])))
            elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
                result.metrics[LOSS_TAG] = float(loss)
        if parts:
            device = parts[0][0].device
            host = torch.cat([t.to(device=device, dtype=torch.float64) for t, _ in parts]).cpu().tolist()  # once
            offset = 0
            for tensor, consume in parts:
                consume(host[offset : offset + tensor.numel()])
                offset += tensor.numel()
        if self.skipped_steps and self._gradients is not None:
            result.metrics[SKIPPED_STEPS_TAG] = float(self.skipped_steps)
        self._report_compile()
        remember(self.figures, result.metrics, step)
        saturation = {_layer_of(tag): v for tag, v in result.metrics.items() if tag.startswith(f"{ACT_SATURATION}/")}
        if saturation:
            self.saturation = [*self.saturation[-HISTORY + 1 :], (step, saturation)]
        return result

    @staticmethod
    def _take_activations(found: Any, result: StepResult) -> None:
        result.metrics.update(found.metrics())
        if found.histograms:
            result.histograms.append((ACTIVATION_HISTOGRAMS, found.histograms))

    def _take_gradients(self, found: Any, result: StepResult, watch: bool) -> None:
        if _not_taken(found.metrics):  # the step's gradient figures describe a step the optimizer did not take
            self.skipped_steps += 1
            found.metrics = {t: v for t, v in found.metrics.items() if split_tag(t)[0] not in (GRAD_NORM, UPDATE_RATIO)}
            found.histograms = []
        result.metrics.update(found.metrics)
        for p, eps in self._eps.items():  # host floats: ||g|| / sqrt(numel) is the per-element RMS gradient
            name = self._gradients.names.get(p)
            norm = found.metrics.get(f"{GRAD_NORM}/{name}") if name is not None else None
            if norm is not None and p.numel():
                result.metrics[f"{GRAD_RMS_EPS}/{name}"] = norm / math.sqrt(p.numel()) / eps
        if found.histograms:
            result.histograms.append((GRADIENT_HISTOGRAMS, found.histograms))
        if watch:
            self._read_watch(found.extra[-6:])  # the steps before first
        total = found.metrics.get(TOTAL_GRADIENT_TAG, 0.0)
        if not self.warned_nonfinite and not math.isfinite(total) and is_rank_zero():  # some gradient is: which
            self._watch_order()
            names = [self._gradients.names[p] for p in self._watched]
            norms = [found.metrics.get(f"{GRAD_NORM}/{name}", 0.0) for name in names]
            bad = [i for i, norm in enumerate(norms) if not math.isfinite(norm)]
            if bad:
                self._report_nonfinite([result.step, bad[0], len(bad)])

    def check_nonfinite(self) -> None:
        """Read the non-finite watch now (one small transfer; an epoch's end)."""
        if self._window is not None and not self.warned_nonfinite and is_rank_zero():
            self._read_watch(self._watch_payload().tolist())

    def _report_nonfinite(self, bad: list[int]) -> None:
        if len(bad) < 3 or bad[0] < 0 or self.warned_nonfinite or not self._watched:
            return
        self.warned_nonfinite = True
        step, index, count = bad
        name = self._gradients.names[self._watched[index]]
        self._warn(
            f"{self.owner}: non-finite gradient at step {step}; the first layer in forward order with a non-finite "
            f"gradient is '{_module_of(name) or name}' (parameter '{name}'); {count} of {len(self._watched)} "
            "parameters affected. Lower the learning rate, check the init (lightning_bn.prepare), or clip gradients."
        )

    def _report_compile(self) -> None:
        if COMPILE_SECONDS and not self._compile_reported:
            self._compile_reported = True
            self._info(
                f"{self.owner}: compiled the fused summary for {len(COMPILE_SECONDS)} tensor rank(s) in "
                f"{sum(COMPILE_SECONDS.values()):.1f} s (once per process; fused='eager' skips it)"
            )

    # ------------------------------------------------------------------------------------------- the pictures
    def heatmap(self) -> tuple[list[list[float]], list[int], list[str], list[str | None]] | None:
        """The saturation heatmap's grid: ``(grid, steps, layers, kinds)``, layers in forward order, rows of
        saturation per logged step (NaN where a layer was not logged); ``None`` when there is nothing to draw."""
        if not (self.options.heatmap and self.saturation):
            return None
        layers = layer_order((name for _, sat in self.saturation for name in sat), self.layers)
        grid = [[sat.get(name, math.nan) for _, sat in self.saturation] for name in layers]
        steps = [step for step, _ in self.saturation]
        kinds = {t.name: t.activation.kind.name for t in self._probe.targets if t.activation} if self._probe else {}
        return grid, steps, layers, [kinds.get(name) for name in layers]

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self.owner} is closed: create a new one to monitor again")

    def _restore_entries(self) -> None:
        for name in list(self._entries):
            self._restore(name)

    def release(self) -> None:
        """Remove every hook and drop what an unfinished step holds (the engine stays usable)."""
        if self._probe is not None:
            self._probe.detach()
        if self._attention is not None:
            self._attention.detach()
            self._attention.reset()
        if self._order is not None:
            self._order.detach()
            self._order = None
        self._restore_entries()
        if self._gradients is not None:
            self._gradients.reset()
        self._pending = None
        _run_eagerly(self, False)

    def close(self) -> None:
        """:meth:`release`, for good: a closed engine attaches nothing again."""
        self.release()
        self.closed = True

    def state_dict(self) -> dict[str, Any]:
        state = {
            "last_logged_step": self.last_logged_step,
            "history": list(self.saturation),
            "warned_nonfinite": self.warned_nonfinite,
        }
        if self.skipped_steps:
            state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_logged_step = int(state.get("last_logged_step", -1))
        self.saturation = [(int(step), dict(sat)) for step, sat in state.get("history", [])]
        self.warned_nonfinite = bool(state.get("warned_nonfinite", False))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def remember(history: dict[str, deque[tuple[int, float]]], metrics: dict[str, float], step: int) -> None:
    """Append the figures just logged (host floats) to ``history``: tag -> the latest :data:`HISTORY` pairs.

    Example::

        >>> history = {}
        >>> remember(history, {"act_std/fc1": 0.5}, step=0)
        >>> list(history["act_std/fc1"])
        [(0, 0.5)]
    """
    for tag, value in metrics.items():
        series = history.get(tag)
        if series is None:
            series = history[tag] = deque(maxlen=HISTORY)
        series.append((step, float(value)))


def _not_taken(metrics: dict[str, float]) -> bool:
    """Whether a logging step's figures are those of an optimizer step not taken: some gradient non-finite and every
    weight measured after the step finite (a ``GradScaler`` skipping an overflow step; a step taken with inf/NaN
    gradients leaves inf/NaN weights)."""
    total = metrics.get(TOTAL_GRADIENT_TAG)
    if total is None or math.isfinite(total):
        return False
    weights = [v for t, v in metrics.items() if split_tag(t)[0] == WEIGHT_NORM]
    return bool(weights) and all(math.isfinite(v) for v in weights)


def _with_attention(
    layers: list[dict[str, Any]], probe: AttentionProbe, found: ModelMap | None, plain: Callable[[str], str]
) -> list[dict[str, Any]]:
    """The layers table with a row per attention site (``hook="attention"``), in forward order: right after the
    latest of its module and its query and key layers (the map's order), or at the end."""
    if found is None or not probe.sites:
        return layers
    rank = {plain(name): i for i, name in enumerate(found.order)}
    out = list(layers)
    taken = {entry["name"] for entry in layers}
    for spec, entry in probe.entries():
        if entry["name"] in taken:
            continue
        taken.add(entry["name"])
        here = max(rank.get(plain(n), -1) for n in (spec.module_name, *spec.query, *spec.key))
        at = len(out)
        for i, other in enumerate(out):
            position = rank.get(other["name"], rank.get(other["name"].rpartition(".")[0]))
            if position is not None and position > here and other.get("hook") != "attention":
                at = i
                break
        out.insert(at, entry)
    return out


def _module_of(parameter: str) -> str:
    return parameter.rpartition(".")[0]


def _layer_of(tag: str) -> str:
    return tag.partition("/")[2]


@contextmanager
def _eager_compiled() -> Iterator[None]:
    """Run ``torch.compile``'d parts of a model eagerly while it is traced (the trace's hooks are no graph); the
    fused pass still runs compiled when chosen (:data:`~lightning_bn.monitoring.rows.eager_stance_held`)."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:
        yield
        return
    held, _rows.eager_stance_held = _rows.eager_stance_held, True
    try:
        with stance("force_eager"):
            yield
    finally:
        _rows.eager_stance_held = held


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the probe's own operations out of a live trace (they run on no tensor of the model's)."""
    with torch._C.DisableTorchFunction():
        yield
