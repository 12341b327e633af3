"""The packages stand in layers: each imports only the floors below it (and itself), never one beside or
above it. `core` is the ground floor that every package may import and that imports none of them.

    core  <-  actors, reward_server  <-  learner  <-  cluster  <-  bench

Imports are read from the source (ast), function-local and TYPE_CHECKING imports included: an import that
runs back up ties the lower floor to the higher one just the same.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"core": 0, "actors": 1, "reward_server": 1, "learner": 2, "cluster": 3, "bench": 4}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, absolute imports only (the project uses no relative ones)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def back_edges(root: Path, floors: dict[str, int]) -> list[str]:
    """Every import from a package to one on its own floor or above, as 'file:line imports module'."""
    edges = []
    for package, floor in floors.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path.read_text()):
                target = module.split(".")[0]
                if target in floors and target != package and floors[target] >= floor:
                    edges.append(f"{path.relative_to(root)}:{line} imports {module}")
    return edges


def test_no_package_imports_one_on_its_floor_or_above():
    edges = back_edges(ROOT, FLOORS)
    assert not edges, "imports that run back up (move what they import down a floor):\n" + "\n".join(edges)


def test_a_back_edge_is_found(tmp_path):
    """The check itself: a ground-floor module importing the learner, an actor importing a reward-server
    module beside it (inside a function), and a downward import, which is allowed."""
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "config.py").write_text("import os\nfrom learner.learner import PPOLearner\n")
    (tmp_path / "actors" / "pool.py").write_text("def f():\n    from reward_server import scorers\n")
    (tmp_path / "cluster" / "job.py").write_text("from core.config import RunConfig\nimport learner.train\n")
    assert back_edges(tmp_path, FLOORS) == ["core/config.py:2 imports learner.learner",
                                            "actors/pool.py:2 imports reward_server"]


def test_every_package_has_a_floor():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(FLOORS), f"give {sorted(packages - set(FLOORS))} a floor in FLOORS"


def test_the_readme_layout_table_names_every_module_of_every_folder():
    """The README's layout table is a newcomer's map: each folder's row names exactly the modules in it."""
    rows = {}
    for line in (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0].splitlines():
        if line.startswith("| `") and "/` |" in line:
            folder, text = line[3:].split("/` |", 1)
            rows[folder] = set(re.findall(r"`(\w+\.py)`", text))
    for package in FLOORS:
        modules = {p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
        assert rows.get(package) == modules, f"README's {package}/ row: missing {sorted(modules - rows.get(package, set()))}, " \
                                             f"gone {sorted(rows.get(package, set()) - modules)}"
