"""The package's structure (docs/design.md, *Layout*): the modules form floors, every import of
a ``cae`` module points down, none hides inside a function, and each file keeps its one job's
boundaries (``rundir`` knows files not devices, ``cluster`` devices not run dirs)."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

PACKAGE = REPO / "cae"


def _imports(path) -> tuple[set[str], set[str], list[str]]:
    """(cae modules imported at module level, third-party top-level packages imported there,
    'line N: module' for every cae import inside a function or class)."""
    tree = ast.parse(path.read_text())
    ours, theirs, nested = set(), set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.module == "cae":
            return [f"cae.{a.name}" for a in node.names]
        return [node.module] if node.module else []

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        found = names(node)
        top_level = node in tree.body
        for name in found:
            if name.startswith("cae."):
                if top_level:
                    ours.add(name.split(".")[1])
                else:
                    nested.append(f"line {node.lineno}: {name}")
            elif top_level:
                theirs.add(name.split(".")[0])
    return ours, theirs, nested


MODULES = {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _floors() -> dict[str, int]:
    """Each module's floor: 0 for one importing no cae module, else one above its highest
    import. Raises on a circle."""
    floors: dict[str, int] = {}

    def floor(name: str, path: tuple[str, ...] = ()) -> int:
        if name in path:
            raise AssertionError(f"import circle: {' -> '.join(path + (name,))}")
        if name not in floors:
            below = [floor(m, path + (name,)) for m in MODULES[name][0]]
            floors[name] = 1 + max(below, default=-1)
        return floors[name]

    for name in MODULES:
        floor(name)
    return floors


def test_the_modules_form_floors_without_a_circle():
    floors = _floors()
    for name, (ours, _, _) in MODULES.items():
        assert all(floors[m] < floors[name] for m in ours), name
    # The layers docs/design.md draws, bottom to top.
    order = [("errors", "files", "cpu_speed"), ("cli", "ops", "checkpoints", "cluster"), ("nn",),
             ("models",), ("config", "baselines"), ("rundir", "experiment"),
             ("report", "ablation_report"),
             ("train",), ("ablate",)]
    for lower, upper in zip(order, order[1:]):
        assert max(floors[m] for m in lower) < min(floors[m] for m in upper), (lower, upper)
    assert floors["visualize"] > floors["experiment"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_cae_import_hides_inside_a_function(name):
    assert MODULES[name][2] == [], f"cae/{name}.py imports inside a function: {MODULES[name][2]}"


def test_each_file_keeps_to_its_job():
    assert MODULES["errors"][0] == set() and MODULES["files"][0] == set()  # the ground floor
    # cluster: devices, mesh, processes; no run dirs, no config, no signals.
    assert MODULES["cluster"][0] == {"errors"}
    # rundir knows files, not devices: the job's agree/primary come in as arguments.
    assert "cluster" not in MODULES["rundir"][0] and "jax" not in MODULES["rundir"][1]
    assert "cluster" not in MODULES["checkpoints"][0]
    assert MODULES["cli"][0] == {"errors"}
    # The commands share experiment's adapters; none imports another command's loop but ablate,
    # which runs cae.train's train_and_evaluate once per run.
    for command in ("visualize", "report", "ablation_report", "experiment"):
        assert "train" not in MODULES[command][0], command
    assert {"experiment"} <= MODULES["visualize"][0] and {"experiment"} <= MODULES["train"][0]


def test_no_module_changes_the_process_umask():
    # Setting the umask to read it is a race with any thread creating files meanwhile; os.open's
    # mode is already reduced by the umask.
    offenders = [p.name for p in PACKAGE.glob("*.py") if "os.umask(" in p.read_text()]
    assert offenders == []
