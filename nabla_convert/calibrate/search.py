"""Choose each layer's NABLA setting from the measured density/error curves.

Per layer and candidate, over the records at NABLA steps (local step >= dense_steps):
- density: mean block density over records and heads;
- error: pooled relative L2 error sqrt(sum |O_c - O_dense|^2 / sum |O_dense|^2) over every sampled row;
- quantile error: the `error_quantile` quantile over calibration samples (prompt x seed) of each
  sample's pooled error, a conservative figure so a budget also holds on unseen prompts.
Every layer may also stay dense (density 1, error 0).

Targets:
- error budget E: each layer takes its sparsest setting whose quantile error is <= E;
- mean density D over the run (over all layers and steps; layers and steps kept dense count 1.0), or a
  speedup S over dense through a step-time cost model (costs.py: attention time ~ fixed + density, dense
  layers on the dense backend, dense steps at dense speed): minimise the sum of the layers' pooled errors. Greedy over the lower convex hull of each layer's (density, error) curve, starting
  from the sparsest settings and buying the steps with the largest error drop per unit of density
  while the budget allows (the Lagrangian solution), then spending what is left on the best
  remaining single-layer improvements; the result is never worse than the best single setting
  shared by all layers, which is tried too.
A chosen setting that keeps every block runs dense (no mask to build).

Dense steps (`dense_step_options`): for each count K the NABLA steps get what the target leaves them
(density (D - K/S) / (1 - K/S) for S steps; the speed budget minus K dense steps); the K whose run error
(the NABLA steps' error terms over every step's dense output) is least wins, for an error budget the K of
least run density.

Per head (`per_head`): every head of a layer takes its own threshold, "dense" being threshold 1 for that
head, under one STA window per layer (several candidate windows: `choose_picks`). The stats already hold each head's density and error
terms, and a head's selection does not depend on the other heads, so any mix is measured exactly:
- mean density D: minimise the sum of the layers' squared pooled errors (a head adds its own error term to its
  layer's), greedy over all (layer, head) hulls at once, never worse than a setting shared by all heads;
- error budget E: per layer, the sparsest mix whose quantile error is <= E among the per-head greedy mixes at a
  ladder of layer densities and the per-layer settings (so never denser than the per-layer search).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from nabla_convert.calibrate.costs import CostModel, cost_models, load_cost_model
from nabla_convert.calibrate.plan import CalibrationError, CalibrationPlan, Candidate
from nabla_convert.calibrate.stats import ComponentStats, Stats
from nabla_convert.config import LayerSettings, NablaConfig

FULL = 1.0 - 1e-6  # a density at or above this keeps every block
SLACK = 1e-6  # relative slack on density budgets: measured densities are float32 means


@dataclass(frozen=True)
class Target:
    """What the search aims at: a mean density, a per-layer error budget, or a speedup through a cost model."""

    kind: Literal["density", "error", "speed"]
    value: float
    error_quantile: float = 0.9
    cost_model: CostModel | None = None  # the speed target's

    def __post_init__(self) -> None:
        if (self.kind == "speed") != (self.cost_model is not None):
            raise CalibrationError(
                "a speed target needs a cost model (--cost-model), and only a speed target takes one"
            )

    @classmethod
    def from_plan(cls, plan: CalibrationPlan) -> Target:
        if plan.target_density is not None:
            return cls("density", plan.target_density, plan.error_quantile)
        if plan.error_budget is not None:
            return cls("error", plan.error_budget, plan.error_quantile)
        if plan.target_speedup is not None:
            if plan.cost_model is None:
                raise CalibrationError(f"a speedup target needs a cost model: --cost-model {'|'.join(cost_models())}")
            return cls("speed", plan.target_speedup, plan.error_quantile, load_cost_model(plan.cost_model))
        raise CalibrationError(
            "no target: give --target-density D, --error-budget E or --target-speedup S "
            "(or calibrate.target_density / error_budget / target_speedup in the recipe)"
        )

    @property
    def label(self) -> str:
        if self.kind == "speed":
            return f"{self.value:g}x faster than dense ({self.cost_model.name} cost model)"
        return f"mean density <= {self.value:g}" if self.kind == "density" else f"layer error <= {self.value:g}"


@dataclass
class Curves:
    """One transformer's measured curves; the last option of each layer is "dense" (density 1, error 0)."""

    density: np.ndarray  # (layers, options)
    error: np.ndarray  # (layers, options), pooled
    error_quantile: np.ndarray  # (layers, options)
    head_density: np.ndarray  # (layers, options, heads)
    head_error: np.ndarray  # (layers, options, heads)
    samples: int
    records: int
    head_num: np.ndarray  # (layers, options, heads): squared error of each head, summed over records
    head_den: np.ndarray  # (layers, heads): squared dense output of each head, summed over records
    sample_num: np.ndarray  # (samples, layers, options, heads): head_num of each calibration sample
    sample_den: np.ndarray  # (samples, layers, heads)
    quantile: float

    def select(self, options: list[int]) -> Curves:
        """The curves of some option columns only, in that order (give the dense column last to keep it last)."""
        return replace(
            self,
            density=self.density[:, options],
            error=self.error[:, options],
            error_quantile=self.error_quantile[:, options],
            head_density=self.head_density[:, options],
            head_error=self.head_error[:, options],
            head_num=self.head_num[:, options],
            sample_num=self.sample_num[:, :, options],
        )

    def pick(self, picks: np.ndarray, layers: np.ndarray | None = None) -> Curves:
        """The curves of one choice, a single option column: head h of layer `layers[i]` takes option picks[i, h].

        `layers` defaults to every layer. A layer's figures are exact for any mix, since heads select alone.
        """
        layers = np.arange(len(picks)) if layers is None else np.asarray(layers)
        rows, heads = layers[:, None], np.arange(picks.shape[1])[None, :]
        head_density = self.head_density[rows, picks, heads]
        head_num = self.head_num[rows, picks, heads]
        sample_num = self.sample_num[:, rows, picks, heads]  # (S, n, H)
        head_den, sample_den = self.head_den[layers], self.sample_den[:, layers]
        per_sample = _relative(sample_num.sum(-1), sample_den.sum(-1))
        return Curves(
            density=head_density.mean(-1)[:, None],
            error=_relative(head_num.sum(-1), head_den.sum(-1))[:, None],
            error_quantile=np.quantile(per_sample, self.quantile, axis=0)[:, None],
            head_density=head_density[:, None],
            head_error=self.head_error[rows, picks, heads][:, None],
            samples=self.samples,
            records=self.records,
            head_num=head_num[:, None],
            head_den=head_den,
            sample_num=sample_num[:, :, None],
            sample_den=sample_den,
            quantile=self.quantile,
        )


def _relative(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.sqrt(np.divide(num, den, out=np.zeros_like(num), where=den > 0))


def curves(
    comp: ComponentStats,
    dense_steps: int = 0,
    quantile: float = 0.9,
    step_weight: Callable[[int], float] | None = None,
) -> Curves:
    """The measured curves over the records at NABLA steps (local step >= dense_steps).

    `step_weight(local_step)` weighs each record's error terms (default 1: every measured step counts the same).
    """
    picked = [i for i, step in enumerate(comp.local_step) if step >= dense_steps]
    if not picked:
        raise CalibrationError(
            f"no measurements at steps >= {dense_steps} (measured local steps: {sorted(set(comp.local_step))})"
        )
    weight = np.array([step_weight(comp.local_step[i]) if step_weight else 1.0 for i in picked])[:, None, None, None]
    density = torch.stack([comp.density[i] for i in picked]).numpy()  # (R, L, C, H)
    num = torch.stack([comp.err_num[i] for i in picked]).numpy() * weight
    den = torch.stack([comp.err_den[i] for i in picked]).numpy()[:, :, None, :] * weight  # (R, L, 1, H)
    samples = np.array([comp.sample[i] for i in picked])
    sample_num = np.stack([num[samples == s].sum(0) for s in np.unique(samples)])  # (S, L, C, H)
    sample_den = np.stack([den[samples == s].sum(0)[:, 0] for s in np.unique(samples)])  # (S, L, H)
    per_sample = _relative(sample_num.sum(-1), sample_den.sum(-1)[:, :, None])

    def with_dense(values: np.ndarray, dense_value: float, axis: int = 1) -> np.ndarray:
        shape = list(values.shape)
        shape[axis] = 1
        return np.concatenate([values, np.full(shape, dense_value)], axis=axis)

    return Curves(
        density=with_dense(density.mean((0, 3)), 1.0),
        error=with_dense(_relative(num.sum((0, 3)), den.sum((0, 3))), 0.0),
        error_quantile=with_dense(np.quantile(per_sample, quantile, axis=0), 0.0),
        head_density=with_dense(density.mean(0), 1.0),
        head_error=with_dense(_relative(num.sum(0), np.broadcast_to(den.sum(0), num.shape[1:])), 0.0),
        samples=len(np.unique(samples)),
        records=len(picked),
        head_num=with_dense(num.sum(0), 0.0),
        head_den=den.sum(0)[:, 0],
        sample_num=with_dense(sample_num, 0.0, axis=2),
        sample_den=sample_den,
        quantile=quantile,
    )


def lower_hull(density: np.ndarray, error: np.ndarray) -> list[int]:
    """Option indices on the lower convex hull of one layer's (density, error) points, by rising density."""
    order = sorted(range(len(density)), key=lambda i: (density[i], error[i]))
    hull: list[int] = []
    for i in order:
        if hull and error[i] >= error[hull[-1]]:
            continue  # denser and no better: never worth buying
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> i
            if (error[b] - error[a]) * (density[i] - density[a]) >= (error[i] - error[a]) * (density[b] - density[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def spend_density(density: np.ndarray, error: np.ndarray, budget: float, fixed: dict[int, int]) -> list[int]:
    """Per layer an option index with sum(density) <= budget and small sum(error) (greedy on the convex hulls).

    `fixed` maps layers to options they must take. Raises when even the sparsest options exceed the budget.
    """
    layers = density.shape[0]
    budget *= 1.0 + SLACK
    hulls = {layer: lower_hull(density[layer], error[layer]) for layer in range(layers) if layer not in fixed}
    choice = {**fixed, **{layer: hull[0] for layer, hull in hulls.items()}}
    total = sum(density[layer, option] for layer, option in choice.items())
    if total > budget:
        raise CalibrationError(
            f"the target cannot be met: the sparsest candidates need {total / layers:.4g} per layer against "
            f"{budget / layers:.4g} (layers kept dense count in full); add lower thresholds or keep fewer layers dense"
        )
    position = dict.fromkeys(hulls, 0)
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        hull, at = hulls[layer], position[layer]
        if at + 1 < len(hull):
            a, b = hull[at], hull[at + 1]
            slope = (error[layer, a] - error[layer, b]) / (density[layer, b] - density[layer, a])
            heapq.heappush(heap, (-slope, layer))

    for layer in hulls:
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        hull, at = hulls[layer], position[layer]
        step = density[layer, hull[at + 1]] - density[layer, hull[at]]
        if total + step <= budget:
            total += step
            position[layer] = at + 1
            choice[layer] = hull[at + 1]
            push(layer)
    # The hull walk stops at a step that does not fit; spend what is left on any (also off-hull) improvement.
    while True:
        moves = [
            (error[layer, choice[layer]] - error[layer, option], -density[layer, option], layer, option)
            for layer in hulls
            for option in range(density.shape[1])
            if error[layer, option] < error[layer, choice[layer]]
            and total + density[layer, option] - density[layer, choice[layer]] <= budget
        ]
        if not moves:
            break
        _, _, layer, option = max(moves)
        total += density[layer, option] - density[layer, choice[layer]]
        choice[layer] = option
    return [choice[layer] for layer in range(layers)]


@dataclass
class LayerChoice:
    layer: int
    candidate: Candidate | None  # None: the layer runs dense
    forced_dense: bool
    density: float
    error: float
    error_quantile: float
    head_density: np.ndarray
    head_error: np.ndarray

    def settings(self) -> LayerSettings:
        if self.candidate is None:
            return LayerSettings(dense=True)
        return self.candidate.settings()

    @property
    def label(self) -> str:
        if self.candidate is None:
            return "dense (kept)" if self.forced_dense else "dense"
        return self.candidate.label


@dataclass
class ComponentChoice:
    name: str
    target: Target
    layers: list[LayerChoice]
    curves: Curves
    config: NablaConfig
    summary: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def mean_density(self) -> float:
        return float(np.mean([c.density for c in self.layers]))

    @property
    def mean_error(self) -> float:
        return float(np.mean([c.error for c in self.layers]))


@dataclass
class Budget:
    """A density or speed target as a cost per (layer, option, head) and the total cost the NABLA steps may take."""

    head_cost: np.ndarray  # (layers, options, heads): a head's part of its layer's cost
    layer_cost: np.ndarray  # (layers, options): the layer's cost when all its heads take the option
    total: float


def nabla_budget(curve: Curves, target: Target, dense_steps: int = 0, steps: int = 1) -> Budget:
    """What the NABLA steps may spend so that the whole run of `steps`, its first `dense_steps` dense, meets `target`.

    Density: the run's mean density (dense steps and dense layers count 1.0). Speed: the cost model's self-attention
    time per NABLA step; a head's part is its layer's time at the head's density over the head count (a layer whose
    heads all run dense counts as dense attention, a dense head in a sparse layer at the sparse kernel's density 1).
    """
    layers, _, heads = curve.head_density.shape
    if target.kind == "density":
        share = dense_steps / steps
        total = (target.value - share) / (1.0 - share) * layers
        return Budget(curve.head_density / heads, curve.density, total)
    model = target.cost_model
    head_cost = model.attention_ms(curve.head_density) / heads
    layer_cost = head_cost.sum(-1)
    layer_cost[:, -1] = model.dense_attention_ms
    return Budget(head_cost, layer_cost, model.attention_budget(target.value, layers, dense_steps, steps))


def choose_options(
    curve: Curves, target: Target, dense_layers: tuple[int, ...], budget: Budget | None = None
) -> list[int]:
    """Per layer the chosen option index (the last index is dense); `budget` defaults to the density target's."""
    layers, options = curve.density.shape
    dense = options - 1
    fixed = {layer: dense for layer in dense_layers}
    if target.kind == "error":
        chosen = []
        for layer in range(layers):
            if layer in fixed:
                chosen.append(dense)
                continue
            fits = [o for o in range(options) if curve.error_quantile[layer, o] <= target.value + 1e-12]
            chosen.append(min(fits, key=lambda o: (curve.density[layer, o], curve.error[layer, o])))
        return chosen
    budget = budget or nabla_budget(curve, target)
    cost, total = budget.layer_cost, budget.total
    greedy = spend_density(cost, curve.error, total, fixed)
    best, best_error = greedy, curve.error[np.arange(layers), greedy].sum()
    for option in range(options):
        uniform = [fixed.get(layer, option) for layer in range(layers)]
        rows = np.arange(layers)
        if cost[rows, uniform].sum() <= total * (1.0 + SLACK) and curve.error[rows, uniform].sum() < best_error:
            best, best_error = uniform, curve.error[rows, uniform].sum()
    return best


def sparsest_mix(curve: Curves, layer: int, budget: float, levels: int = 32) -> np.ndarray:
    """Per head of `layer` an option, the mix of least density whose quantile error is <= `budget`.

    Tried: every setting shared by all heads (the per-layer choices, dense among them) and the per-head greedy
    mixes (least squared error for a density) at `levels` layer densities between the sparsest and dense.
    """
    density, error = curve.head_density[layer].T, curve.head_num[layer].T  # (heads, options)
    heads, options = density.shape
    mixes = [np.full(heads, option) for option in range(options)]
    for level in np.linspace(density.min(1).sum(), heads, levels):
        mixes.append(np.array(spend_density(density, error, level, {})))
    figures = curve.pick(np.stack(mixes), np.full(len(mixes), layer))
    fits = np.flatnonzero(figures.error_quantile[:, 0] <= budget + 1e-12)
    best = min(fits, key=lambda i: (figures.density[i, 0], figures.error[i, 0]))
    return mixes[best]


def choose_head_options(
    curve: Curves, target: Target, dense_layers: tuple[int, ...], budget: Budget | None = None
) -> np.ndarray:
    """Per layer and head the chosen option index (layers, heads); the last index is dense (threshold 1)."""
    layers, options, heads = curve.head_density.shape
    dense = options - 1
    if target.kind == "error":
        return np.stack(
            [
                np.full(heads, dense) if layer in dense_layers else sparsest_mix(curve, layer, target.value)
                for layer in range(layers)
            ]
        )
    # a head's share of its layer's squared pooled error: the shares of a layer's heads add up to its error^2
    layer_den = curve.head_den.sum(-1)[:, None, None]
    share = np.divide(curve.head_num, layer_den, out=np.zeros_like(curve.head_num), where=layer_den > 0)
    budget = budget or nabla_budget(curve, target)
    density = budget.head_cost.transpose(0, 2, 1).reshape(layers * heads, options)
    cost = share.transpose(0, 2, 1).reshape(layers * heads, options)
    fixed = {layer * heads + head: dense for layer in dense_layers for head in range(heads)}
    tried = [np.array(spend_density(density, cost, budget.total, fixed)).reshape(layers, heads)]
    for option in range(options):
        uniform = np.full((layers, heads), option)
        uniform[list(dense_layers)] = dense
        tried.append(uniform)
    units = np.arange(layers * heads)
    fits = [p for p in tried if density[units, p.ravel()].sum() <= budget.total * (1.0 + SLACK)]
    return min(fits, key=lambda p: cost[units, p.ravel()].sum())


def head_candidate(candidates: list[Candidate], options: np.ndarray) -> Candidate | None:
    """The setting of a layer whose head h takes option options[h]: one candidate, per-head thresholds, or dense.

    The heads' options share one STA window (a dense head keeps every block under any window)."""
    dense = len(candidates)
    if (options == dense).all():
        return None
    if (options == options[0]).all():
        return candidates[options[0]]
    windows = {candidates[o].sta for o in options.tolist() if o != dense}
    if len(windows) > 1:
        raise CalibrationError(f"one layer's heads mix STA windows {sorted(map(str, windows))}")
    thresholds = tuple(1.0 if o == dense else candidates[o].threshold for o in options.tolist())
    return Candidate(thresholds, windows.pop())


def choose_picks(
    curve: Curves,
    candidates: list[Candidate],
    allowed: list[int],
    target: Target,
    dense_layers: tuple[int, ...],
    per_head: bool,
    dense_steps: int,
    steps: int,
) -> np.ndarray:
    """Per layer and head an option index into `candidates` + dense (the last), among the `allowed` candidates.

    Per layer, a layer takes one candidate (any window). Per head, a layer's heads share one STA window: for an error
    budget each layer takes its sparsest mix under any window; for a density or speed target every window is searched
    for the whole model (plus the per-layer choice over all windows) and the least sum of squared layer errors wins.
    """
    dense = len(candidates)
    heads = curve.head_density.shape[2]

    def solve(columns: list[int], heads_apart: bool) -> np.ndarray:
        sub = curve.select([*columns, dense])
        budget = None if target.kind == "error" else nabla_budget(sub, target, dense_steps, steps)
        if heads_apart:
            picks = choose_head_options(sub, target, dense_layers, budget)
        else:
            picks = np.repeat(np.array(choose_options(sub, target, dense_layers, budget))[:, None], heads, 1)
        return np.array([*columns, dense])[picks]

    if not per_head:
        return solve(allowed, heads_apart=False)
    windows = list(dict.fromkeys(candidates[i].sta for i in allowed))
    if len(windows) == 1:
        return solve(allowed, heads_apart=True)
    tried, failure = [], None
    for window in windows:  # a window too dense for the target drops out
        try:
            tried.append(solve([i for i in allowed if candidates[i].sta == window], heads_apart=True))
        except CalibrationError as err:
            failure = err
    if target.kind == "error":  # layers are independent: each takes its sparsest fitting mix under any window
        density = np.stack([curve.pick(p).density[:, 0] for p in tried])  # (windows, layers)
        return np.stack([tried[w][layer] for layer, w in enumerate(density.argmin(0))])
    try:
        tried.append(solve(allowed, heads_apart=False))
    except CalibrationError as err:
        failure = err
    if not tried:
        raise failure
    return min(tried, key=lambda p: (curve.pick(p).error[:, 0] ** 2).sum())


def run_error(curve: Curves, full: Curves, picks: np.ndarray) -> np.ndarray:
    """Per layer the relative error of `picks` over the whole run: NABLA-step error terms over every step's output.

    `curve` holds the records at NABLA steps, `full` every record (dense steps add no error, only output)."""
    picked = curve.pick(picks)
    return _relative(picked.head_num[:, 0].sum(-1), full.head_den.sum(-1))


def search(
    stats: Stats,
    target: Target,
    dense_layers: tuple[int, ...] = (),
    dense_steps: int = 0,
    per_head: bool = False,
    *,
    windows: tuple[tuple[int, int, int] | None, ...] | None = None,
    dense_step_options: tuple[int, ...] = (),
) -> dict[str, ComponentChoice]:
    """Per transformer: the chosen per-layer (or per-head) settings and the NablaConfig that carries them.

    `windows` restricts the candidates to those STA windows (None: every measured one). `dense_step_options`
    lets the search choose how many first steps run dense (else `dense_steps` is fixed): for a density or speed
    target the one with the least run error (sum over layers, squared per head) that meets the target, for an error
    budget the one of least run density.
    """
    candidates = stats.candidates
    base = stats.base_config
    steps = stats.meta["plan"]["steps"]
    allowed = [i for i, c in enumerate(candidates) if windows is None or c.sta in windows]
    if not allowed:
        raise CalibrationError(f"no measured candidate has an STA window among {list(windows or ())}")
    options = tuple(dict.fromkeys(dense_step_options or (dense_steps,)))
    bad_steps = [k for k in options if not 0 <= k < steps]
    if bad_steps:
        raise CalibrationError(f"dense steps {bad_steps} out of range: the runs have {steps} steps")
    chosen: dict[str, ComponentChoice] = {}
    for name, comp in stats.components.items():
        bad = [layer for layer in dense_layers if not 0 <= layer < comp.num_layers]
        if bad:
            raise CalibrationError(f"dense layers {bad} out of range: {name} has {comp.num_layers} layers")
        full = curves(comp, 0, target.error_quantile)
        trials, failure = [], None
        for k in options:
            try:
                curve = curves(comp, k, target.error_quantile)
                picks = choose_picks(curve, candidates, allowed, target, tuple(dense_layers), per_head, k, steps)
            except CalibrationError as err:
                failure = err
                continue
            error = run_error(curve, full, picks)
            run_density = k / steps + (1 - k / steps) * curve.pick(picks).density.mean()
            score = run_density if target.kind == "error" else ((error**2).sum() if per_head else error.sum())
            trials.append((score, k, curve, picks, error, run_density))
        if not trials:
            raise failure
        _, k, curve, picks, error, run_density = min(trials, key=lambda trial: trial[0])
        picked = curve.pick(picks)
        layers = []
        for layer, options_of_heads in enumerate(picks):
            runs_dense = picked.density[layer, 0] >= FULL
            layers.append(
                LayerChoice(
                    layer=layer,
                    candidate=None if runs_dense else head_candidate(candidates, options_of_heads),
                    forced_dense=layer in dense_layers,
                    density=float(picked.density[layer, 0]),
                    error=float(picked.error[layer, 0]),
                    error_quantile=float(picked.error_quantile[layer, 0]),
                    head_density=picked.head_density[layer, 0],
                    head_error=picked.head_error[layer, 0],
                )
            )
        choice = ComponentChoice(name, target, layers, curve, base)
        choice.summary = {
            "target": target.kind,
            "target_value": target.value,
            "error_quantile": target.error_quantile,
            "mean_density": choice.mean_density,
            "run_density": float(run_density),
            "mean_error": choice.mean_error,
            "run_error": float(error.mean()),
            "max_error": max(c.error for c in layers),
            "dense_layers": sum(c.candidate is None for c in layers),
            "dense_steps": k,
            "per_head": per_head,
            "windows": len({c.candidate.sta for c in layers if c.candidate}),
            "samples": curve.samples,
            "records": curve.records,
            "candidates": len(allowed),
            "query_blocks": stats.meta["plan"]["query_blocks"],
        }
        if target.kind == "speed":
            choice.summary["cost_model"] = target.cost_model.name
            choice.summary["predicted_speedup"] = target.cost_model.speedup(
                [c.density for c in layers], [c.candidate is None for c in layers], k, steps
            )
        choice.config = replace(
            base,
            layers={c.layer: c.settings() for c in layers},
            dense_layers=tuple(dense_layers),
            dense_steps=k,
        ).with_provenance(calibration=dict(choice.summary))
        chosen[name] = choice
    return chosen


def config_picks(comp: ComponentStats, candidates: list[Candidate], config: NablaConfig) -> np.ndarray:
    """Per layer and head the measured option `config` selects (the last index is dense); an error if unmeasured."""
    index = {(c.threshold, c.sta): i for i, c in enumerate(candidates)}
    dense = len(candidates)
    picks = []
    for layer in range(comp.num_layers):
        settings = config.layer(layer)
        if settings.keeps_all:
            picks.append([dense] * comp.num_heads)
            continue
        row = []
        for threshold in settings.thresholds(comp.num_heads):
            if threshold >= 1.0:
                row.append(dense)
            elif (threshold, settings.sta) in index:
                row.append(index[(threshold, settings.sta)])
            else:
                raise CalibrationError(f"layer {layer}: {settings} is not among the measured candidates")
        picks.append(row)
    return np.array(picks)


def evaluate(comp: ComponentStats, candidates: list[Candidate], config: NablaConfig, dense_steps: int = 0) -> Curves:
    """The measured density and error of `config`'s per-layer (or per-head) settings on (other) stats.

    Returns Curves with a single option column, for checking a choice on held-out prompts and seeds.
    """
    return curves(comp, dense_steps).pick(config_picks(comp, candidates, config))


def predict(comp: ComponentStats, candidates: list[Candidate], config: NablaConfig, steps: int) -> dict[str, float]:
    """What the stats predict for `config` over a run of `steps` (its dense steps included): quality proxies.

    density: the run's mean block density (dense steps count 1.0). mean_error: the mean layer error at the NABLA
    steps (what the per-layer search minimises). run_error: the mean layer error over the whole run (dense steps add
    output, no error). rms_run_error: the root mean square of that (the per-head search's objective).
    step_weighted_error: run_error with each step's error terms weighted by the steps left after it (S - step), as
    an error made early is carried through more denoising steps.
    """
    picks = config_picks(comp, candidates, config)
    k = config.dense_steps
    curve, full = curves(comp, k), curves(comp, 0)
    run = run_error(curve, full, picks)

    def remaining(step: int) -> float:
        return float(steps - step)

    weighted = run_error(curves(comp, k, step_weight=remaining), curves(comp, 0, step_weight=remaining), picks)
    return {
        "density": k / steps + (1 - k / steps) * float(curve.pick(picks).density.mean()),
        "mean_error": float(curve.pick(picks).error.mean()),
        "run_error": float(run.mean()),
        "rms_run_error": float(np.sqrt((run**2).mean())),
        "step_weighted_error": float(weighted.mean()),
    }
