"""Choose each layer's NABLA setting from the measured density/error curves.

Per layer and candidate, over the records at NABLA steps (local step >= dense_steps):
- density: mean block density over records and heads;
- error: pooled relative L2 error sqrt(sum |O_c - O_dense|^2 / sum |O_dense|^2) over every sampled row;
- quantile error: the `error_quantile` quantile over calibration samples (prompt x seed) of each
  sample's pooled error, a conservative figure so a budget also holds on unseen prompts.
Every layer may also stay dense (density 1, error 0).

Targets:
- error budget E: each layer takes its sparsest setting whose quantile error is <= E;
- mean density D (over all layers, layers kept dense count 1.0): minimise the sum of the layers'
  pooled errors. Greedy over the lower convex hull of each layer's (density, error) curve, starting
  from the sparsest settings and buying the steps with the largest error drop per unit of density
  while the budget allows (the Lagrangian solution), then spending what is left on the best
  remaining single-layer improvements; the result is never worse than the best single setting
  shared by all layers, which is tried too.
A chosen setting that keeps every block runs dense (no mask to build).

Per head (`per_head`, one STA window or none among the candidates): every head of a layer takes its own
threshold, "dense" being threshold 1 for that head. The stats already hold each head's density and error
terms, and a head's selection does not depend on the other heads, so any mix is measured exactly:
- mean density D: minimise the sum of the layers' squared pooled errors (a head adds its own error term to its
  layer's), greedy over all (layer, head) hulls at once, never worse than a setting shared by all heads;
- error budget E: per layer, the sparsest mix whose quantile error is <= E among the per-head greedy mixes at a
  ladder of layer densities and the per-layer settings (so never denser than the per-layer search).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from nabla_convert.calibrate.plan import CalibrationError, CalibrationPlan, Candidate
from nabla_convert.calibrate.stats import ComponentStats, Stats
from nabla_convert.config import LayerSettings, NablaConfig

FULL = 1.0 - 1e-6  # a density at or above this keeps every block
SLACK = 1e-6  # relative slack on density budgets: measured densities are float32 means


@dataclass(frozen=True)
class Target:
    kind: Literal["density", "error"]
    value: float
    error_quantile: float = 0.9

    @classmethod
    def from_plan(cls, plan: CalibrationPlan) -> Target:
        if plan.target_density is not None:
            return cls("density", plan.target_density, plan.error_quantile)
        if plan.error_budget is not None:
            return cls("error", plan.error_budget, plan.error_quantile)
        raise CalibrationError(
            "no target: give --target-density D or --error-budget E (or calibrate.target_density / error_budget in the recipe)"
        )

    @property
    def label(self) -> str:
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


def curves(comp: ComponentStats, dense_steps: int = 0, quantile: float = 0.9) -> Curves:
    picked = [i for i, step in enumerate(comp.local_step) if step >= dense_steps]
    if not picked:
        raise CalibrationError(
            f"no measurements at steps >= {dense_steps} (measured local steps: {sorted(set(comp.local_step))})"
        )
    density = torch.stack([comp.density[i] for i in picked]).numpy()  # (R, L, C, H)
    num = torch.stack([comp.err_num[i] for i in picked]).numpy()
    den = torch.stack([comp.err_den[i] for i in picked]).numpy()[:, :, None, :]  # (R, L, 1, H)
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
            f"the target cannot be met: the sparsest candidates give a mean density of {total / layers:.4g} "
            "(layers kept dense count 1.0); add lower thresholds or keep fewer layers dense"
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


def choose_options(curve: Curves, target: Target, dense_layers: tuple[int, ...]) -> list[int]:
    """Per layer the chosen option index (the last index is dense)."""
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
    budget = target.value * layers
    greedy = spend_density(curve.density, curve.error, budget, fixed)
    best, best_error = greedy, curve.error[np.arange(layers), greedy].sum()
    for option in range(options):
        uniform = [fixed.get(layer, option) for layer in range(layers)]
        rows = np.arange(layers)
        if (
            curve.density[rows, uniform].sum() <= budget * (1.0 + SLACK)
            and curve.error[rows, uniform].sum() < best_error
        ):
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


def choose_head_options(curve: Curves, target: Target, dense_layers: tuple[int, ...]) -> np.ndarray:
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
    density = curve.head_density.transpose(0, 2, 1).reshape(layers * heads, options)
    cost = share.transpose(0, 2, 1).reshape(layers * heads, options)
    fixed = {layer * heads + head: dense for layer in dense_layers for head in range(heads)}
    budget = target.value * layers * heads
    tried = [np.array(spend_density(density, cost, budget, fixed)).reshape(layers, heads)]
    for option in range(options):
        uniform = np.full((layers, heads), option)
        uniform[list(dense_layers)] = dense
        tried.append(uniform)
    units = np.arange(layers * heads)
    fits = [p for p in tried if density[units, p.ravel()].sum() <= budget * (1.0 + SLACK)]
    return min(fits, key=lambda p: cost[units, p.ravel()].sum())


def head_candidate(candidates: list[Candidate], options: np.ndarray) -> Candidate | None:
    """The setting of a layer whose head h takes option options[h]: one candidate, per-head thresholds, or dense."""
    if (options == len(candidates)).all():
        return None
    if (options == options[0]).all():
        return candidates[options[0]]
    thresholds = tuple(1.0 if o == len(candidates) else candidates[o].threshold for o in options.tolist())
    return Candidate(thresholds, candidates[0].sta)


def search(
    stats: Stats,
    target: Target,
    dense_layers: tuple[int, ...] = (),
    dense_steps: int = 0,
    per_head: bool = False,
) -> dict[str, ComponentChoice]:
    """Per transformer: the chosen per-layer (or per-head) settings and the NablaConfig that carries them."""
    candidates = stats.candidates
    base = stats.base_config
    if per_head and len({c.sta for c in candidates}) > 1:
        raise CalibrationError(
            "a per-head search needs candidates with one STA window (or none): a layer has one window for all heads"
        )
    chosen: dict[str, ComponentChoice] = {}
    for name, comp in stats.components.items():
        bad = [layer for layer in dense_layers if not 0 <= layer < comp.num_layers]
        if bad:
            raise CalibrationError(f"dense layers {bad} out of range: {name} has {comp.num_layers} layers")
        curve = curves(comp, dense_steps, target.error_quantile)
        if per_head:
            picks = choose_head_options(curve, target, tuple(dense_layers))
        else:
            picks = np.repeat(np.array(choose_options(curve, target, tuple(dense_layers)))[:, None], comp.num_heads, 1)
        picked = curve.pick(picks)
        layers = []
        for layer, options in enumerate(picks):
            runs_dense = picked.density[layer, 0] >= FULL
            layers.append(
                LayerChoice(
                    layer=layer,
                    candidate=None if runs_dense else head_candidate(candidates, options),
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
            "mean_error": choice.mean_error,
            "max_error": max(c.error for c in layers),
            "dense_layers": sum(c.candidate is None for c in layers),
            "dense_steps": dense_steps,
            "per_head": per_head,
            "samples": curve.samples,
            "records": curve.records,
            "candidates": len(candidates),
            "query_blocks": stats.meta["plan"]["query_blocks"],
        }
        choice.config = replace(
            base,
            layers={c.layer: c.settings() for c in layers},
            dense_layers=tuple(dense_layers),
            dense_steps=dense_steps,
        ).with_provenance(calibration=dict(choice.summary))
        chosen[name] = choice
    return chosen


def evaluate(comp: ComponentStats, candidates: list[Candidate], config: NablaConfig, dense_steps: int = 0) -> Curves:
    """The measured density and error of `config`'s per-layer (or per-head) settings on (other) stats.

    Returns Curves with a single option column, for checking a choice on held-out prompts and seeds.
    """
    curve = curves(comp, dense_steps)
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
    return curve.pick(np.array(picks))
