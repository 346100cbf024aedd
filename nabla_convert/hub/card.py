"""The model card of a converted checkpoint, written only from what the folder holds.

Every figure comes from a file: the sparse-attention settings from the transformer config's `_nabla` entry,
measurements from nabla_reports/*.json, origin from the recorded provenance, sizes from the safetensors headers.
What the folder does not say (a license, a base model id) is left out rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from nabla_convert.config import threshold_text
from nabla_convert.hub.checks import REPORTS_DIR, Checkpoint, TransformerInfo
from nabla_convert.io import markdown_table
from nabla_convert.models import all_pipeline_tags

TAGS = ["nabla", "sparse-attention", "nabla-convert"]
REPORT_TITLES = {"calibration": "Calibration", "eval": "Evaluation", "bench": "Benchmark"}
PAPER = "[NABLA](https://arxiv.org/abs/2507.13546) (Neighborhood Adaptive Block-Level Attention)"


def hub_model_id(value: Any) -> str | None:
    """`value` if it names a Hub model (card metadata must), else None.

    Only namespace/name ids qualify: a bare word is more likely the name of a local folder than a legacy model.
    """
    if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value if "/" in value else None


def card_data(checkpoint: Checkpoint) -> ModelCardData:
    provenance = checkpoint.transformers[0].nabla.provenance
    base_model = hub_model_id(provenance.get("base_model"))
    # The Hub reads a relation only next to a base model; plain conversion keeps the weights, so it names none.
    extra = {"base_model_relation": "finetune"} if base_model and "adaptation" in provenance else {}
    return ModelCardData(
        base_model=base_model,
        license=provenance.get("base_license"),
        library_name="diffusers",
        pipeline_tag=all_pipeline_tags().get(checkpoint.pipeline_class or ""),
        tags=TAGS,
        **extra,
    )


def generate_card(checkpoint: Checkpoint, repo_id: str) -> str:
    """README.md text (YAML metadata + markdown) for `checkpoint` published as `repo_id`; deterministic."""
    sections = [
        f"# {repo_id.split('/')[-1]}",
        introduction(checkpoint),
        configuration_section(checkpoint),
        measurements_section(checkpoint.reports),
        usage_section(checkpoint, repo_id),
        provenance_section(checkpoint),
    ]
    card = ModelCard(f"---\n{card_data(checkpoint).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    return str(card)


def introduction(checkpoint: Checkpoint) -> str:
    provenance = checkpoint.transformers[0].nabla.provenance
    nabla = checkpoint.transformers[0].nabla
    what = f"A diffusers `{checkpoint.pipeline_class}`" if checkpoint.pipeline_class else "A diffusers transformer"
    origin = ""
    if provenance.get("base_model"):
        origin = f", converted from `{provenance['base_model']}`"
        if provenance.get("base_revision"):
            origin += f" at revision `{provenance['base_revision']}`"
    blocks = (
        f"{nabla.q_block}"
        if nabla.q_block == nabla.kv_block
        else f"{nabla.q_block} (queries) / {nabla.kv_block} (keys)"
    )
    tool = provenance.get("tool", "nabla-convert")
    if provenance.get("tool_version"):
        tool += f" {provenance['tool_version']}"
    lines = [
        f"{what} whose video self-attention runs {PAPER}{origin} with {tool}.",
        "",
        f"In each sparse self-attention call, queries and keys are averaged over blocks of {blocks} tokens "
        f"(tokens are reordered so that a block of {nabla.tile[0] * nabla.tile[1]} is one "
        f"{nabla.tile[0]}x{nabla.tile[1]} spatial tile of a latent frame). A softmax over the pooled scores gives "
        "every query block a distribution over key blocks, and attention is computed only on the key blocks that "
        "hold the `threshold` share of that mass, optionally united with a sliding-tile (STA) window. Text "
        "cross-attention and the layers listed as dense stay dense.",
    ]
    if "adaptation" in provenance:
        lines += ["", "The weights were fine-tuned for sparse attention after conversion (see Provenance)."]
    return "\n".join(lines)


def configuration_section(checkpoint: Checkpoint) -> str:
    parts = ["## Sparse attention configuration"]
    for transformer in checkpoint.transformers:
        if len(checkpoint.transformers) > 1:
            parts.append(f"### {transformer.subfolder}")
        parts.append(transformer_tables(transformer))
    return "\n\n".join(parts)


def transformer_tables(transformer: TransformerInfo) -> str:
    nabla = transformer.nabla
    settings = [
        ("default threshold", nabla.threshold),
        ("default STA window (T, H, W tiles)", window(nabla.sta)),
        ("tile (latent tokens, H x W)", f"{nabla.tile[0]}x{nabla.tile[1]}"),
        ("query / key block (tokens)", f"{nabla.q_block} / {nabla.kv_block}"),
        ("dense denoising steps", nabla.dense_steps),
        ("backend", nabla.backend),
        ("parameters", f"{transformer.num_parameters:,}"),
    ]
    num_layers = transformer.num_layers
    indices = range(num_layers) if num_layers is not None else sorted(set(nabla.layers) | set(nabla.dense_layers))
    rows = []
    for index in indices:
        layer = nabla.layer(index)
        mode = "dense" if layer.dense else ("NABLA + STA" if layer.sta else "NABLA")
        rows.append(
            [
                index,
                mode,
                "-" if layer.dense else threshold_text(layer.threshold),
                "-" if layer.dense else window(layer.sta),
            ]
        )
    return (
        markdown_table(["setting", "value"], settings)
        + "\n\nPer layer:\n\n"
        + markdown_table(["layer", "self-attention", "threshold", "STA window"], rows)
    )


def measurements_section(reports: dict[str, dict[str, Any]]) -> str:
    if not reports:
        return f"## Measurements\n\nThis checkpoint ships no calibration, evaluation or benchmark reports ({REPORTS_DIR}/)."
    parts = ["## Measurements"]
    ordered = [name for name in REPORT_TITLES if name in reports] + sorted(set(reports) - set(REPORT_TITLES))
    for name in ordered:
        report = reports[name]
        parts.append(f"### {REPORT_TITLES.get(name, name)} (`{REPORTS_DIR}/{name}.json`)")
        parts.append(markdown_table(["metric", "value"], list(flatten(report["summary"]).items())))
        layers = [layer for layer in report.get("layers", []) if isinstance(layer, dict)]
        if layers:
            columns = list(dict.fromkeys(key for layer in layers for key in layer))
            parts.append(markdown_table(columns, [[layer.get(key, "") for key in columns] for layer in layers]))
    return "\n\n".join(parts)


def usage_section(checkpoint: Checkpoint, repo_id: str) -> str:
    if checkpoint.pipeline_class:
        loader, name = checkpoint.pipeline_class, "pipe"
        imports = f"from diffusers import {loader}"
    else:
        loader, name = checkpoint.transformers[0].config["_class_name"], "transformer"
        imports = f"from nabla_convert import {loader}"
    return "\n".join(
        [
            "## Usage",
            "",
            "Install `nabla-convert` next to diffusers: the checkpoint's config names its transformer class from "
            "`nabla_convert`, which applies the settings above when the weights load.",
            "",
            "```python",
            imports,
            "",
            f'{name} = {loader}.from_pretrained("{repo_id}")',
            "```",
        ]
    )


def provenance_section(checkpoint: Checkpoint) -> str:
    """One table, or one per transformer when their records differ (e.g. calibrated separately)."""
    provenances = {
        t.subfolder or "transformer": {
            key: value for key, value in flatten(t.nabla.provenance).items() if value is not None
        }
        for t in checkpoint.transformers
    }
    first = next(iter(provenances.values()))
    if not any(provenances.values()):
        return "## Provenance\n\nThe checkpoint records no provenance."
    if all(provenance == first for provenance in provenances.values()):
        return "## Provenance\n\n" + markdown_table(["field", "value"], list(first.items()))
    parts = ["## Provenance"]
    for subfolder, provenance in provenances.items():
        parts += [f"### {subfolder}", markdown_table(["field", "value"], list(provenance.items()))]
    return "\n\n".join(parts)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted keys, so that every recorded value gets one table row."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def window(sta: tuple[int, int, int] | None) -> str:
    return "-".join(str(size) for size in sta) if sta else "none"
