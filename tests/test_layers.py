"""The layers hold: workers do not reach into the web app, and only the lifecycle writes a task's status.

Both read the source (Python's own parser), so they fail on the line that breaks the rule,
whatever runs or does not run in a test.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

WEB_LAYER = ("webapp.services", "webapp.views")
# Tables whose `status` is not a task's: webhook deliveries (jobs/deliver.py, webapp/outbox.py).
OTHER_TABLES = re.compile(r"_d\b|_deliveries|Delivery|delivery|_e\b|Endpoint|batch", re.IGNORECASE)
# A value that is a task's status (a `status=` of any call, `dict(status=…)` included, or a dict key).
TASK_STATUS = re.compile(r"TaskStatus|['\"](PENDING|PROCESSING|COMPLETED|FAILED|CANCELLED)['\"]")
SET_STATUS = re.compile(r"UPDATE\s+tasks\s+SET(?P<set>.*?)(?:\bFROM\b|\bWHERE\b|$)", re.IGNORECASE | re.DOTALL)


def modules(root: Path, *folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (root / folder).rglob("*.py"))


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(root: Path, path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names (at any depth: in functions too)."""
    package = module_name(root, path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(root, path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.append((node.lineno, origin))
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
    return found


def web_imports(root: Path) -> list[str]:
    """The imports of the web layer by jobs/, as "file:line module"."""
    return [
        f"{path.relative_to(root)}:{line} {name}"
        for path in modules(root, "jobs")
        for line, name in imported(root, path)
        if name.startswith(WEB_LAYER)
    ]


def test_jobs_import_nothing_from_the_web_layer():
    assert web_imports(ROOT) == []


def test_loading_every_job_module_loads_no_web_module():
    """The same, through everything the job modules load in turn (a fresh interpreter)."""
    names = [module_name(ROOT, path) for path in modules(ROOT, "jobs")]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({WEB_LAYER!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def _root_table(node: ast.AST) -> str | None:
    """Follow a statement chain (`update(T).where(…).values(…)`) down to `T`'s source, or None."""
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("update", "insert") and node.args:
                return ast.unparse(node.args[0])
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return None


def status_writes(root: Path) -> list[str]:
    """Where a module outside webapp/lifecycle writes a task's status, as "file:line code"."""
    found = []
    for path in modules(root, "webapp", "jobs"):
        if path.is_relative_to(root / "webapp" / "lifecycle"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            hit = False
            if isinstance(node, ast.Call):
                keywords = {k.arg for k in node.keywords}
                dict_keys = {
                    key.value
                    for arg in node.args
                    if isinstance(arg, ast.Dict)
                    for key in arg.keys
                    if isinstance(key, ast.Constant)
                }
                values = [k.value for k in node.keywords if k.arg == "status"]
                if any(TASK_STATUS.search(ast.unparse(value)) for value in values):
                    hit = True
                elif "status" in keywords | dict_keys:
                    if isinstance(node.func, ast.Name) and node.func.id == "Task":
                        hit = True
                    elif isinstance(node.func, ast.Attribute) and node.func.attr == "values":
                        table = _root_table(node.func.value)
                        hit = table is None or not OTHER_TABLES.search(table)
            elif isinstance(node, ast.Dict):
                hit = any(
                    isinstance(key, ast.Constant)
                    and key.value == "status"
                    and not isinstance(value, ast.JoinedStr)  # a message about statuses
                    and TASK_STATUS.search(ast.unparse(value))
                    for key, value in zip(node.keys, node.values, strict=True)
                )
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                hit = any(
                    isinstance(t, ast.Attribute)
                    and t.attr == "status"
                    and not OTHER_TABLES.search(ast.unparse(t.value))
                    for t in targets
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                hit = any(re.search(r"\bstatus\s*=", m["set"]) for m in SET_STATUS.finditer(node.value))
            if hit:
                found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)[:80]}")
    return found


def test_only_the_lifecycle_writes_a_task_status():
    assert status_writes(ROOT) == []
