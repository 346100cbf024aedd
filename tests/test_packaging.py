"""The package as users get it: which modules the CLI loads, which packages it declares, what the wheel ships."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "wan2.1-t2v-14b-720p-nabla0.7"
HEAVY = ("torch", "diffusers", "accelerate", "peft", "matplotlib", "transformers")


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["bench", "--help"], ["eval", "--help"]])
def test_help_imports_no_model_training_or_plotting_stack(args):
    script = (
        "import json, sys\n"
        "from nabla_convert.cli import main\n"
        "try:\n"
        f"    main({args!r}, prog_name='nabla-convert')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "Usage: nabla-convert" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_wheel_ships_recipes_and_prompts_and_converts_from_elsewhere(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    for name in ("nabla_convert", "recipes", "calibration"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*build, "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("nabla_convert-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    expected = {
        f"nabla_convert/data/{path.relative_to(ROOT).as_posix()}"
        for pattern in ("recipes/**/*.yaml", "calibration/*.txt")
        for path in ROOT.glob(pattern)
    } | {path.relative_to(ROOT).as_posix() for path in (ROOT / "nabla_convert").rglob("*.py")}
    assert expected <= shipped, sorted(expected - shipped)

    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [str(target / "bin" / "nabla-convert"), "convert", "--recipe", RECIPE, "--out", "converted"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((elsewhere / "converted" / "transformer" / "config.json").read_text())
    assert config["_nabla"]["provenance"]["recipe"] == RECIPE
    assert (
        config["_nabla"]["threshold"]
        == yaml.safe_load((ROOT / "recipes" / f"{RECIPE}.yaml").read_text())["nabla"]["threshold"]
    )
    where = subprocess.run(
        [sys.executable, "-c", "import nabla_convert.shipped as s; print(s.shipped_folder('calibration'))"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == target / "nabla_convert" / "data" / "calibration"


def imported_distributions() -> dict[str, set[str]]:
    """Distribution -> modules of nabla_convert importing it, from every non-optional import statement.

    Imports inside `try: ... except ImportError` are optional (triton on CPU-only installs) and not counted.
    """
    optional: set[int] = set()
    found: dict[str, set[str]] = {}
    top_level = packages_distributions()
    for path in sorted((ROOT / "nabla_convert").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                optional |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                name = module.split(".")[0]
                if name in sys.stdlib_module_names or name == "nabla_convert":
                    continue
                for distribution in top_level.get(name, [name]):
                    found.setdefault(canonical(distribution), set()).add(path.relative_to(ROOT).as_posix())
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        canonical(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]) for requirement in project["dependencies"]
    }
    undeclared = {name: sorted(users) for name, users in imported_distributions().items() if name not in declared}
    assert undeclared == {}


def test_readme_map_lists_every_file_of_the_package_and_scripts():
    """README's layout map has one line per source file of nabla_convert/ and scripts/, and names nothing else."""
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    mapped = {path for path in re.findall(r"^\| `([^`]+)`", layout, flags=re.MULTILINE) if path.endswith(".py")}
    files = {
        path.relative_to(ROOT).as_posix()
        for folder in ("nabla_convert", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if "pipeline" not in path.parts
    }
    assert mapped == files, {"not in the map": sorted(files - mapped), "not in the tree": sorted(mapped - files)}
