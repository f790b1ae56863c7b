"""Conformance over real architectures (tests/zoo.py): detection, prepare(), the report and the init check.

Every case is built from the library that defines it with random weights and small sizes. Per model:

- the traced activation after each spot-checked layer is the one the architecture's source applies;
- ``prepare`` runs, and the output on the example input stays finite;
- tied parameters stay one tensor and deliberately zero parameters stay zero;
- the report is true to what was done: its rows name modules of the model, each layer it initialized changed, and
  no parameter or buffer outside a reported layer or a norm changed;
- ``init_mismatches`` finds nothing, as built (the architectures' own inits are deliberate) and after ``prepare``.

Only public APIs are used: ``lightning_bn.tracing.trace_model``, ``lightning_bn.prepare``,
``lightning_bn.guards.init_mismatches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lightning_bn
from lightning_bn.guards import init_mismatches
from lightning_bn.tracing import NORM_TYPES, trace_model
from tests.zoo import ZOO, ZooCase, main_output, run_model

NAMES = sorted(ZOO)
_TORCH_NORMS = NORM_TYPES  # the norm classes the library itself knows


def build(name: str) -> ZooCase:
    """A fresh case; skips the test when the installed libraries lack the architecture."""
    try:
        return ZOO[name]()
    except ImportError as error:
        pytest.skip(f"{name}: {error}")


@cache
def built(name: str) -> ZooCase:
    """One case per model for the read-only checks (trace, init check as built)."""
    return build(name)


@dataclass
class Prepared:
    case: ZooCase
    before: dict[str, Tensor]  # state_dict before prepare, cloned
    report: Any = None
    error: BaseException | None = None


@cache
def _prepared(name: str) -> Prepared:
    case = build(name)
    before = {k: v.detach().clone() for k, v in case.model.state_dict().items()}
    torch.manual_seed(0)
    try:
        report = lightning_bn.prepare(case.model, case.example_input)
    except Exception as error:  # reported by each test that needs the prepared model
        return Prepared(case, before, error=error)
    return Prepared(case, before, report)


def prepared(name: str) -> Prepared:
    """The model after ``prepare`` (one run per model for the whole module); fails the test if ``prepare`` raised."""
    result = _prepared(name)
    if result.error is not None:
        raise AssertionError(f"prepare() raised on {name}: {result.error!r}") from result.error
    return result


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_NORMS) or "norm" in type(module).__name__.lower()


def output_of(case: ZooCase) -> Tensor:
    with torch.no_grad():
        return main_output(run_model(case.model, case.example_input))


# ---- the zoo itself -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zoo_case_is_well_formed(name):
    """The case runs, its output is finite, its ties are ties and its zero parameters are zero, as built."""
    case = built(name)
    params = dict(case.model.named_parameters(remove_duplicate=False))
    modules = dict(case.model.named_modules(remove_duplicate=False))
    assert torch.isfinite(output_of(case)).all()
    assert case.expected and set(case.expected) <= set(modules), set(case.expected) - set(modules)
    for a, b in case.ties:
        assert params[a] is params[b], (a, b)
    for zero in case.zero_params:
        assert not params[zero].detach().any(), zero


# ---- detection ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_spot_checks(name):
    """``trace_model(...).layers[layer].activation.describe()`` is the activation the architecture applies."""
    case = built(name)
    layers = trace_model(case.model, case.example_input).layers
    got = {
        layer: layers[layer].activation.describe() if layer in layers else "<not traced as a layer>"
        for layer in case.expected
    }
    wrong = {layer: f"expected {want!r}, got {got[layer]!r}" for layer, want in case.expected.items()
             if got[layer] != want}  # fmt: skip
    assert not wrong, wrong


# ---- the init check -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_init_check_as_built_finds_nothing(name):
    """The architectures' own inits are deliberate: no finding on the model as its library builds it (but the true
    ones a case documents, which must be found)."""
    case = built(name)
    findings = init_mismatches(case.model, case.example_input)
    assert {f.problem for f in findings} == set(case.known_findings), [
        (f.name, f.problem, round(f.value, 3)) for f in findings
    ]


@pytest.mark.parametrize("name", NAMES)
def test_init_check_after_prepare_finds_nothing(name):
    result = prepared(name)
    findings = init_mismatches(result.case.model, result.case.example_input)
    assert findings == [], [(f.name, f.problem, round(f.value, 3)) for f in findings]


# ---- prepare --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_prepare_runs_and_output_stays_finite(name):
    result = prepared(name)
    out = output_of(result.case)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs of {out.numel()}"


@pytest.mark.parametrize("name", NAMES)
def test_prepare_keeps_ties_and_zeros(name):
    result = prepared(name)
    params = dict(result.case.model.named_parameters(remove_duplicate=False))
    untied = [(a, b) for a, b in result.case.ties
              if params[a] is not params[b] or params[a].data_ptr() != params[b].data_ptr()]  # fmt: skip
    assert not untied, f"no longer one tensor: {untied}"
    nonzero = {z: int(params[z].detach().count_nonzero()) for z in result.case.zero_params
               if params[z].detach().any()}  # fmt: skip
    assert not nonzero, f"deliberately zero, now with non-zero entries: {nonzero}"


@pytest.mark.parametrize("name", NAMES)
def test_report_rows_name_modules_of_the_model(name):
    result = prepared(name)
    modules = dict(result.case.model.named_modules(remove_duplicate=False))
    unknown = [row.layer for row in result.report.layers if row.layer not in modules]
    assert not unknown, unknown


@pytest.mark.parametrize("name", NAMES)
def test_report_initialized_layers_changed(name):
    """Every row whose scheme is not "skip" names a layer whose weight was actually re-drawn."""
    result = prepared(name)
    modules = dict(result.case.model.named_modules(remove_duplicate=False))
    after = result.case.model.state_dict()
    unchanged = []
    for row in result.report.layers:
        if row.scheme == "skip" or row.layer not in modules:
            continue
        weights = [n for n, _ in modules[row.layer].named_parameters(recurse=False) if "weight" in n]
        assert weights, f"reported layer {row.layer} has no weight"
        unchanged += [f"{row.layer}.{w} ({row.scheme})" for w in weights
                      if torch.equal(result.before[f"{row.layer}.{w}"], after[f"{row.layer}.{w}"])]  # fmt: skip
    assert not unchanged, f"reported as initialized, weight unchanged: {unchanged}"


@pytest.mark.parametrize("name", NAMES)
def test_nothing_outside_reported_layers_and_norms_changed(name):
    """Parameters and buffers of no reported layer and no norm (LayerScale, position embeddings, tokens, relative
    position tables, buffers) are left as they were."""
    result = prepared(name)
    model = result.case.model
    modules = dict(model.named_modules(remove_duplicate=False))
    reported = {id(p) for row in result.report.layers if row.layer in modules for p in modules[row.layer].parameters()}
    changed = []
    for key, value in model.state_dict(keep_vars=True).items():
        owner = modules[key.rsplit(".", 1)[0]] if "." in key else model
        if id(value) in reported or is_norm(owner):
            continue
        if not torch.equal(result.before[key], value.detach()):
            changed.append(key)
    assert not changed, f"changed, though in no reported layer and no norm: {changed}"
