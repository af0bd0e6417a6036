"""The code's shape: stages/ holds only what dvc.yaml runs, the package never imports a stage, commands install."""

from __future__ import annotations

import ast
import re
from importlib.metadata import entry_points

import yaml

from tests.conftest import PROJECT

PACKAGE = PROJECT / "anomaly_pipeline"


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_stages_holds_exactly_the_scripts_dvc_yaml_runs() -> None:
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    commands = [stage.get("do", stage)["cmd"] for stage in stages.values()]
    run = {re.search(r"python -m stages\.(\w+)", command).group(1) for command in commands}
    scripts = {path.stem for path in (PROJECT / "stages").glob("*.py")} - {"__init__"}
    assert scripts == run
    deps = [dep for stage in stages.values() for dep in stage.get("do", stage)["deps"]]
    assert all(f"stages/{name}.py" in deps for name in scripts)  # each stage depends on its own script


def test_the_package_never_imports_a_stage_or_a_benchmark() -> None:
    for module in PACKAGE.glob("*.py"):
        upward = {name for name in imported_modules(module) if name.split(".")[0] in ("stages", "benchmarks")}
        assert not upward, f"{module.name} imports {upward}"


def test_no_module_is_longer_than_about_300_lines() -> None:
    modules = [*PACKAGE.glob("*.py"), *PROJECT.glob("stages/*.py")]
    lengths = {path.name: len(path.read_text().splitlines()) for path in modules}
    assert max(lengths.values()) <= 300, lengths


def test_predict_and_export_are_installed_commands() -> None:
    scripts = {entry.name: entry for entry in entry_points(group="console_scripts")}
    from anomaly_pipeline import export, predict

    assert scripts["anomaly-predict"].load() is predict.cli
    assert scripts["anomaly-export"].load() is export.cli


def test_the_readme_reads_in_five_minutes_and_every_module_is_in_the_package_docstring() -> None:
    lines = (PROJECT / "README.md").read_text().splitlines()
    assert len(lines) <= 250 and max(len(line) for line in lines) <= 120  # history goes to benchmarks/README.md
    listed = re.findall(r"\b(\w+)\.py\b", (PACKAGE / "__init__.py").read_text())
    assert set(listed) >= {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
