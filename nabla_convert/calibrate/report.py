"""Calibration outputs: nabla_config.json, calibration.json, report.md and PNG plots.

Plots are drawn on matplotlib Figure objects (no pyplot global state), one set per transformer:
`<component>_layers.png` (density and error of each layer at its chosen setting),
`<component>_curves.png` (every layer's error-vs-density curve, chosen points marked) and
`<component>_masks.png` (pooled block maps of a few layers and heads, and the blocks the chosen
setting keeps, recomputed from the stored maps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from nabla_convert.attention.mask import compose_mask, real_blocks, select_by_mass, sta_block_mask
from nabla_convert.calibrate.search import ComponentChoice
from nabla_convert.calibrate.stats import Stats
from nabla_convert.io import atomic_write, atomic_write_text, markdown_table

CONFIG_FILE = "nabla_config.json"
REPORT_FILE = "report.md"
SUMMARY_FILE = "calibration.json"


def save_figure(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_layers(choice: ComponentChoice, path: Path) -> None:
    layers = [c.layer for c in choice.layers]
    fig = Figure(figsize=(max(6.0, 0.25 * len(layers) + 2), 5.5), layout="constrained")
    ax_density, ax_error = fig.subplots(2, 1, sharex=True)
    colors = ["0.6" if c.candidate is None else "tab:blue" for c in choice.layers]
    ax_density.bar(layers, [c.density for c in choice.layers], color=colors)
    ax_density.set_ylabel("block density")
    ax_density.set_ylim(0, 1.05)
    ax_error.bar(layers, [c.error for c in choice.layers], color="tab:red", label="pooled")
    ax_error.plot(layers, [c.error_quantile for c in choice.layers], "k.", label=f"q{choice.target.error_quantile:g}")
    ax_error.set_ylabel("relative L2 error")
    ax_error.set_xlabel("self-attention layer (grey: dense)")
    ax_error.set_ylim(
        0,
        1.15
        * max(
            choice.target.value if choice.target.kind == "error" else 0.0,
            *[c.error_quantile for c in choice.layers],
            1e-3,
        ),
    )
    ax_error.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    target_axis = ax_density if choice.target.kind == "density" else ax_error
    target_axis.axhline(choice.target.value, color="k", linestyle="--", linewidth=0.8)
    fig.suptitle(f"{choice.name}: chosen settings ({choice.target.label})")
    save_figure(fig, path)


def plot_curves(choice: ComponentChoice, candidate_sta: list[Any], path: Path) -> None:
    curve = choice.curves
    layers = curve.density.shape[0]
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    windows = list(dict.fromkeys(candidate_sta))
    styles = ["-", "--", ":", "-."]
    for layer in range(layers):
        color = cmap(layer / max(layers - 1, 1))
        for w_index, window in enumerate(windows):
            options = [o for o, w in enumerate(candidate_sta) if w == window]
            ax.plot(
                curve.density[layer, options],
                curve.error[layer, options],
                styles[w_index % len(styles)],
                color=color,
                marker=".",
                linewidth=0.9,
            )
    chosen = choice.layers
    ax.scatter(
        [c.density for c in chosen], [c.error for c in chosen], marker="x", color="red", zorder=3, label="chosen"
    )
    ax.set_xlabel("block density")
    ax.set_ylabel("relative L2 attention-output error")
    ax.set_xlim(0, 1.02)
    ax.legend(loc="upper right")
    line_styles = ", ".join(f"'{styles[i % len(styles)]}' {window_label(w)}" for i, w in enumerate(windows))
    ax.set_title(f"{choice.name}: error vs density of each layer's candidates ({line_styles})", fontsize="small")
    fig.colorbar(ScalarMappable(norm=Normalize(0, max(layers - 1, 1)), cmap=cmap), ax=ax, label="layer")
    save_figure(fig, path)


def window_label(window: Any) -> str:
    return "STA " + "-".join(map(str, window)) if window else "no STA"


def kept_blocks(stats: Stats, block_map: torch.Tensor, choice_layer: Any, head: int) -> torch.Tensor:
    """The (nq, nk) blocks a layer's chosen setting keeps for one stored pooled map of `head`."""
    layout, base = stats.layout, stats.base_config
    kv_real = real_blocks(layout, base.kv_block, "cpu")
    candidate = choice_layer.candidate
    if candidate is None:
        return kv_real.expand_as(block_map).clone()
    threshold = candidate.threshold[head] if isinstance(candidate.threshold, tuple) else candidate.threshold
    sta_blocks = sta_block_mask(layout, candidate.sta, base.q_block, base.kv_block, "cpu") if candidate.sta else None
    return compose_mask(select_by_mass(block_map, threshold), sta_blocks, kv_real)


def plot_masks(stats: Stats, choice: ComponentChoice, path: Path) -> bool:
    """Pooled block maps (log10) and the chosen kept blocks of the stored layers and heads; False if none stored."""
    comp = stats.components[choice.name]
    panels = [(layer, i, head) for layer in sorted(comp.maps) for i, head in enumerate(comp.map_heads)]
    if not panels:
        return False
    fig = Figure(figsize=(7.5, 3.2 * len(panels)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(panels), 2))
    for row, (layer, i, head) in enumerate(panels):
        block_map = comp.maps[layer][i]
        kept = kept_blocks(stats, block_map, choice.layers[layer], head)
        image = axes[row, 0].imshow(
            torch.log10(block_map.clamp(min=1e-8)).numpy(), cmap="magma", interpolation="nearest"
        )
        fig.colorbar(image, ax=axes[row, 0], fraction=0.046, label="log10 p")
        axes[row, 0].set_title(f"layer {layer} head {head}: pooled map", fontsize="small")
        axes[row, 1].imshow(kept.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axes[row, 1].set_title(
            f"black: kept at {choice.layers[layer].label} ({kept.float().mean():.2f} of blocks)", fontsize="small"
        )
        for ax in axes[row]:
            ax.set_xlabel("key block")
            ax.set_ylabel("query block")
    fig.suptitle(f"{choice.name}: block masks (sample 0, step {stats.meta['map_step']})")
    save_figure(fig, path)
    return True


def layer_rows(choices: dict[str, ComponentChoice]) -> list[dict[str, Any]]:
    """The "layers" list of calibration.json."""
    rows = []
    for name, choice in choices.items():
        for c in choice.layers:
            rows.append(
                {
                    "component": name,
                    "layer": c.layer,
                    "threshold": 1.0 if c.candidate is None else c.candidate.threshold,
                    "sta": "-".join(map(str, c.candidate.sta)) if c.candidate and c.candidate.sta else None,
                    "dense": c.candidate is None,
                    "density": c.density,
                    "error": c.error,
                    "error_quantile": c.error_quantile,
                }
            )
    return rows


def summary(stats: Stats, choices: dict[str, ComponentChoice]) -> dict[str, Any]:
    """The flat "summary" object of calibration.json; per-transformer keys are prefixed when there are two."""
    plan = stats.meta["plan"]
    flat: dict[str, Any] = {
        "model": stats.meta["model"],
        "height": plan["height"],
        "width": plan["width"],
        "frames": plan["frames"],
        "steps": plan["steps"],
        "guidance": plan["guidance"],
        "measured_steps": ",".join(map(str, stats.meta["measured_steps"])),
        "prompts": len({s["label"] for s in stats.meta["samples"]}),
        "seeds": ",".join(map(str, plan["seeds"])),
    }
    for name, choice in choices.items():
        prefix = f"{name}." if len(choices) > 1 else ""
        flat.update({prefix + key: value for key, value in choice.summary.items()})
    return flat


def render_report(stats: Stats, choices: dict[str, ComponentChoice], images: dict[str, list[str]]) -> str:
    plan, layout = stats.meta["plan"], stats.layout
    any_choice = next(iter(choices.values()))
    lines = [
        "# NABLA calibration",
        "",
        f"- model: `{stats.meta['model']}`",
        f"- samples: {len(stats.meta['samples'])} (prompts x seeds {list(plan['seeds'])}), "
        f"{plan['height']}x{plan['width']}, {plan['frames']} frames, {plan['steps']} steps, guidance {plan['guidance']}",
        f"- token grid {layout.token_grid} in {layout.tile_h}x{layout.tile_w} tiles ({layout.padded_len} tokens padded); "
        f"blocks {stats.base_config.q_block}x{stats.base_config.kv_block}",
        f"- measured steps {stats.meta['measured_steps']}; searched over steps >= {any_choice.summary['dense_steps']} "
        "(earlier steps run dense)",
        f"- candidates: thresholds {list(plan['thresholds'])} x STA {[window_label(w) for w in plan['sta']]}, or dense",
        f"- target: {any_choice.target.label}; "
        + ("one threshold per attention head" if any_choice.summary.get("per_head") else "one setting per layer"),
        "",
        "Density is the share of (query block, key block) pairs computed, over blocks holding real tokens. Error is the "
        "relative L2 distance of the layer's attention output from dense attention, exact on "
        f"{plan['query_blocks']} query blocks per call drawn uniformly without replacement (seeded by sample, step, "
        f"layer and call), pooled over all measured calls; q{any_choice.target.error_quantile:g} is the quantile over "
        "samples of each sample's pooled error (the figure an error budget is checked against).",
    ]
    for name, choice in choices.items():
        s = choice.summary
        speed = (
            f" Predicted speedup over dense {s['predicted_speedup']:.2f}x ({s['cost_model']} cost model)."
            if "predicted_speedup" in s
            else ""
        )
        lines += [
            "",
            f"## {name}",
            "",
            f"Mean density {s['mean_density']:.4f} at the NABLA steps, {s['run_density']:.4f} over the run "
            f"({s['dense_steps']} dense step(s)); mean error {s['mean_error']:.4f}, max error {s['max_error']:.4f}, "
            f"{s['dense_layers']} dense layer(s); {s['samples']} samples, {s['records']} measured steps.{speed}",
            "",
            markdown_table(
                [
                    "layer",
                    "setting",
                    "density",
                    "error",
                    f"error q{choice.target.error_quantile:g}",
                    "head density",
                    "head error max",
                ],
                [
                    [
                        c.layer,
                        c.label,
                        c.density,
                        c.error,
                        c.error_quantile,
                        f"{c.head_density.min():.3f}-{c.head_density.max():.3f}",
                        float(c.head_error.max()),
                    ]
                    for c in choice.layers
                ],
            ),
            "",
            *[f"![{image}]({image})" for image in images[name]],
        ]
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, stats: Stats, choices: dict[str, ComponentChoice]) -> Path:
    """Write nabla_config.json, calibration.json, report.md and the plots into `out`; returns report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {name: choice.config.to_dict() for name, choice in choices.items()}
    config_data = next(iter(configs.values())) if len(configs) == 1 else configs
    atomic_write_text(out / CONFIG_FILE, json.dumps(config_data, indent=2) + "\n")
    report_data = {"summary": summary(stats, choices), "layers": layer_rows(choices)}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(report_data, indent=2) + "\n")
    candidate_sta = [c.sta for c in stats.candidates]
    images: dict[str, list[str]] = {}
    for name, choice in choices.items():
        images[name] = [f"{name}_layers.png", f"{name}_curves.png"]
        plot_layers(choice, out / images[name][0])
        plot_curves(choice, candidate_sta, out / images[name][1])
        if plot_masks(stats, choice, out / f"{name}_masks.png"):
            images[name].append(f"{name}_masks.png")
    atomic_write_text(out / REPORT_FILE, render_report(stats, choices, images))
    return out / REPORT_FILE
