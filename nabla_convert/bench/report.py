"""The bench report: rows of every benchmark, its JSON (a flat `summary` first) and its Markdown tables."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nabla_convert.config import threshold_text
from nabla_convert.io import atomic_write_text

OWN_IMPLEMENTATION = "nabla-convert"  # a step row's NABLA; "diffusers built-in" is the family's own (builtin_nabla)

if TYPE_CHECKING:
    from nabla_convert.bench.experiments import BlockSizeRow, KernelRow
    from nabla_convert.bench.measure import AttentionRow, StepRow


@dataclass
class BenchReport:
    environment: dict[str, str]
    settings: dict[str, Any]
    attention: list[AttentionRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    block_sizes: list[BlockSizeRow] = field(default_factory=list)
    compiles: dict[str, Any] = field(default_factory=dict)
    kernels: list[KernelRow] = field(default_factory=list)
    pipelines: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, float | str]:
        """Flat key -> number/string, the `summary` object of nabla_reports/bench.json."""
        out: dict[str, float | str] = {k: v for k, v in self.environment.items() if k != "host"}
        for row in self.attention:
            key = f"d{row.density:g}"
            out[f"attention_speedup_{key}"] = round(row.speedup, 3)
            out[f"attention_sparse_ms_{key}"] = round(row.sparse_ms, 3)
        if self.attention:
            out["attention_dense_ms"] = round(self.attention[0].dense_ms, 3)
            out["mask_ms"] = round(self.attention[0].mask_fast_ms, 3)
        for row in self.steps:
            if row.error is not None:
                continue
            key = f"d{row.density:g}" if row.density is not None else f"thr{threshold_text(row.threshold)}"
            builtin = "_builtin" if row.implementation != OWN_IMPLEMENTATION else ""
            out[f"step_speedup_{key}{builtin}{'_compiled' if row.compiled else ''}"] = round(row.speedup, 3)
        return out

    def to_json(self) -> dict[str, Any]:
        def rows(items):
            return [{**asdict(r), **_properties(r)} for r in items]

        return {
            "summary": self.summary(),
            "environment": self.environment,
            "settings": self.settings,
            "attention": rows(self.attention),
            "steps": rows(self.steps),
            "block_sizes": rows(self.block_sizes),
            "compiles": self.compiles,
            "kernels": rows(self.kernels),
            "pipelines": self.pipelines,
        }

    def write(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    def table(self) -> str:
        """Markdown tables for stdout and docs/benchmarks.md."""
        env = self.environment
        lines = [f"{env['card']} · torch {env['torch']} · {env['date']}", ""]
        if self.attention:
            lines += [
                "| tokens (padded) | heads | blocks q x kv | density | mask ms (reference) | sparse ms | target 1.3·d·dense | "
                "dense ms (backend) | speedup incl. mask |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in self.attention:
                reference = f" ({r.mask_reference_ms:.1f})" if r.mask_reference_ms is not None else ""
                lines.append(
                    f"| {r.tokens:,} ({r.padded_tokens:,}) | {r.heads} | {r.q_block}x{r.kv_block} | {r.density:g} | "
                    f"{r.mask_fast_ms:.2f}{reference} | {r.sparse_ms:.2f} | {r.target_ms:.2f} | "
                    f"{r.dense_ms:.2f} ({r.dense_backend}) | {r.speedup:.2f}x |"
                )
            lines.append("")
        if self.steps:
            lines += [
                "| model (blocks) | tokens (padded) | mode | density | dense ms | NABLA ms | speedup "
                "| peak GiB dense / NABLA | NABLA first-call overhead s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in self.steps:
                if r.density is not None:
                    density = f"{r.density:g}"
                elif r.measured_density is None:
                    density = f"thr {threshold_text(r.threshold)}"
                else:
                    density = f"thr {threshold_text(r.threshold)} -> {r.measured_density:.3f}"
                mode = "eager" if not r.compiled else f"compiled ({r.graph_breaks} graph breaks)"
                if r.implementation != OWN_IMPLEMENTATION:
                    mode = f"{r.implementation}, {mode}"
                if r.error is not None:
                    lines.append(
                        f"| {r.arch} ({r.layers}) | {r.tokens:,} ({r.padded_tokens:,}) | {mode} | {density} | "
                        f"{r.dense_ms:.1f} | fails: {r.error} | - | - | - |"
                    )
                    continue
                lines.append(
                    f"| {r.arch} ({r.layers}) | {r.tokens:,} ({r.padded_tokens:,}) | {mode} | {density} | "
                    f"{r.dense_ms:.1f} | {r.nabla_ms:.1f} | {r.speedup:.2f}x | "
                    f"{r.dense_peak_gib:.1f} / {r.nabla_peak_gib:.1f} | {r.compile_s:.1f} |"
                )
            lines.append("")
        if self.block_sizes:
            lines += [
                "| blocks q x kv | density | forward ms | fwd+bwd ms | compile s fwd / bwd | note |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for r in self.block_sizes:
                both = f"{r.forward_backward_ms:.1f}" if r.forward_backward_ms is not None else "-"
                bwd = f"{r.compile_backward_s:.0f}" if r.compile_backward_s is not None else "-"
                lines.append(
                    f"| {r.q_block}x{r.kv_block} | {r.density:g} | {r.forward_ms:.2f} | {both} | "
                    f"{r.compile_forward_s:.0f} / {bwd} | {r.error or ''} |"
                )
            lines.append("")
        if self.kernels:
            lines += [
                "| tokens (padded) | heads x head dim | blocks q x kv | density | kernel options | sparse ms |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for r in self.kernels:
                ms = f"{r.sparse_ms:.2f}" if r.sparse_ms is not None else f"fails: {r.error}"
                lines.append(
                    f"| {r.tokens:,} ({r.padded_tokens:,}) | {r.heads} x {r.head_dim} | {r.q_block}x{r.kv_block} | "
                    f"{r.density:g} | {r.options} | {ms} |"
                )
            lines.append("")
        if self.pipelines:
            lines += ["| pipeline run | seconds (of which VAE decode) |", "| --- | --- |"]
            lines += [f"| {p['name']} | {p['total_s']:.2f} ({p.get('decode_s', 0):.1f}) |" for p in self.pipelines]
            lines.append("")
        if self.compiles:
            lines.append("compiles: " + ", ".join(f"{k}={v}" for k, v in self.compiles.items()))
        return "\n".join(lines)


def _properties(row: Any) -> dict[str, float]:
    return {name: getattr(row, name) for name in ("speedup", "target_ms") if hasattr(type(row), name)}
