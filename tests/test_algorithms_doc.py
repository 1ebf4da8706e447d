"""docs/algorithms.md lists exactly the registered algorithm types, with the planner's paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trinity.algorithms import ALGORITHMS, build_loss_plan

DOC = Path(__file__).parent.parent / "docs" / "algorithms.md"
NOT_HERE = ("refused",)  # rows for types refused at config check


def table_rows() -> dict[str, list[str]]:
    """The rows of the section "## Table" (other sections have tables of their own)."""
    rows = {}
    section = DOC.read_text().split("\n## Table\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("algorithm_type",):
            assert cells[0] not in rows, f"{cells[0]} listed twice"
            rows[cells[0]] = cells[1:]
    return rows


def builtin_algorithm_types() -> set[str]:
    """Registered by the package alone (other tests register plugin algorithms in-process)."""
    code = "import json; from trinity.registry import ALGORITHMS; print(json.dumps(ALGORITHMS.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_the_table_lists_exactly_the_registered_types():
    rows = table_rows()
    runnable = {name for name, cells in rows.items() if not cells[2].startswith(NOT_HERE)}
    assert runnable == builtin_algorithm_types()


def test_each_row_names_the_defaults_and_the_planned_paths():
    for name, (advantage, loss, path, path_kl_off) in table_rows().items():
        if name not in ALGORITHMS:
            continue
        spec = ALGORITHMS.get(name)
        assert advantage.split(" ")[0] == (spec.advantage_fn or "–"), name
        assert loss == spec.policy_loss_fn, name
        assert path == build_loss_plan({"algorithm_type": name}).path, name
        kl_off = build_loss_plan({"algorithm_type": name, "kl_loss_fn": "none"})
        assert path_kl_off == kl_off.path, name
