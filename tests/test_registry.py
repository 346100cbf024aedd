"""The model-family registry: lookup by class (subclasses too), by config class name and by pipeline; and that
family-specific diffusers classes are imported only by the family modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel, UNet2DConditionModel, WanTransformer3DModel

import nabla_convert
from nabla_convert import NablaConfig, apply_nabla
from nabla_convert.config import ConfigError
from nabla_convert.models import families, family_for_class_name, family_of, family_of_pipeline, nabla_classes
from nabla_convert.models.tiny import tiny_transformer, tiny_wan_pipeline

PACKAGE = Path(nabla_convert.__file__).parent


def test_lookup_by_class_subclass_name_and_pipeline():
    wan, k5 = family_of(WanTransformer3DModel), family_of(Kandinsky5Transformer3DModel)
    assert {wan.name, k5.name} == {"wan", "kandinsky5"}

    class MyWan(WanTransformer3DModel):
        pass

    assert family_of(MyWan) is wan
    assert family_of(nabla_classes()["NablaWanTransformer3DModel"]) is wan
    assert family_for_class_name("NablaKandinsky5Transformer3DModel") is k5
    assert family_for_class_name("UNet2DConditionModel") is None
    assert family_of_pipeline(tiny_wan_pipeline()) is wan
    with pytest.raises(ConfigError, match="no NABLA adapter for UNet2DConditionModel"):
        family_of(UNet2DConditionModel)


def test_apply_nabla_on_a_user_subclass():
    """A subclass of a family's class runs that class's NABLA path: the stock class's output with the same weights,
    and not the dense one."""

    class MyWan(WanTransformer3DModel):
        pass

    stock = tiny_transformer()
    model = MyWan.from_config(stock.config)
    model.load_state_dict(stock.state_dict())
    x, timestep, text = torch.randn(1, 16, 2, 32, 32), torch.tensor([500.0]), torch.randn(1, 3, 32)
    with torch.no_grad():
        dense = model(x, timestep, text, return_dict=False)[0]
        for transformer in (model, stock):
            apply_nabla(transformer, NablaConfig(threshold=0.5))
        out, expected = (transformer(x, timestep, text, return_dict=False)[0] for transformer in (model, stock))
    torch.testing.assert_close(out, expected)
    assert (out - dense).abs().max() > 1e-4


def test_family_classes_are_imported_only_by_family_modules():
    """No module outside nabla_convert/models/ (and the embedded reference model) imports a family's diffusers class."""
    family_names = set()
    for family in families():
        family_names |= family.class_names() | set(family.pipeline_tags)
        family_names |= {cls.__name__ for cls in family.transformer_classes}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("models", "reference"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                offenders += [f"{path.name}: {alias.name}" for alias in node.names if alias.name in family_names]
    assert offenders == []
