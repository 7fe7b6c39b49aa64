"""dvc.yaml's deps cover every module a stage can import, so an edit to any of them makes the stage stale.

The import graph is read from the source (every ``import``, at module level or inside a function, of
``lfdm`` and ``stages``), starting from what ``python -m stages <name>`` runs: a superset of what one run
loads, never less."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCAL_PACKAGES = ("lfdm", "stages")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def imported_names(path: Path) -> Iterator[str]:
    """Every name an import statement in ``path`` may load; ``from a import b`` yields ``a`` and ``a.b``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # the project imports absolutely; a relative import would escape this reading
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_closure(entry_modules: Iterable[str]) -> set[Path]:
    """The files of every local module reachable from ``entry_modules``, the packages' ``__init__`` included."""
    files: set[Path] = set()
    pending = list(entry_modules)
    while pending:
        parts = pending.pop().split(".")
        if parts[0] not in LOCAL_PACKAGES:
            continue
        for depth in range(1, len(parts) + 1):
            module = ".".join(parts[:depth])
            path = module_file(module)
            if path is not None and path not in files:
                files.add(path)
                pending.extend(imported_names(path))
    return files


def uncovered(files: Iterable[Path], deps: Iterable[str]) -> list[str]:
    """The files (repo-relative) that no dep names, itself or as a folder above it."""
    paths = [d.rstrip("/") for d in deps if "${" not in d]  # ${paths.*} are data, not code
    relative = (f.relative_to(ROOT).as_posix() for f in files)
    return sorted(f for f in relative if not any(f == d or f.startswith(d + "/") for d in paths))


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_imports_is_a_dvc_dep(stage: str):
    files = import_closure(["stages.__main__", f"stages.{stage}"])
    assert len(files) > 5  # the graph was followed, not stopped at the entry
    missing = uncovered(files, STAGES[stage]["deps"])
    assert not missing, f"dvc.yaml: stage {stage!r} imports these but does not list them in deps: {missing}"


def test_a_missing_dep_is_caught():
    files = import_closure(["stages.__main__", "stages.train_dm"])
    deps = [d for d in STAGES["train_dm"]["deps"] if d != "lfdm/diffusion.py"]
    assert uncovered(files, deps) == ["lfdm/diffusion.py"]
    # a folder dep covers what is under it, and only that
    assert uncovered([ROOT / "lfdm/data/frames.py"], ["lfdm/data"]) == []
    assert uncovered([ROOT / "lfdm/data_tools.py"], ["lfdm/data"]) == ["lfdm/data_tools.py"]


def test_imports_inside_functions_are_followed():
    files = import_closure(["stages.__main__"])
    # stages/__init__.py imports lfdm.tracking inside a function only
    assert ROOT / "lfdm/tracking.py" in files
    assert ROOT / "lfdm/__init__.py" in files
