"""The import layers of advvit, defined once as data here, and the checks that the code keeps to them.

The table lives with its test rather than in the package: nothing at run time reads it, and the
architecture document's module table is checked against the same scan (below) instead of
restating it.

Every ``import`` and ``from ... import`` of every advvit module is read with ``ast``, at module
level and inside functions alike (an import moved into a function still runs, and hiding a cycle
is what such a move would do), relative or absolute, and so are ``importlib.import_module`` calls
with a literal name.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

REPO = Path(__file__).resolve().parents[1]

# Bottom-up: a module imports from its own layer and the layers below it, never from above.
# ``name.*`` stands for the package ``name`` and every module in it.
LAYERS: Sequence[Tuple[str, Sequence[str]]] = (
    # The package itself and the torchvision guard it runs on every import of advvit sit under
    # the public API that imports torch only.
    ("public API (torch only)",
     ("advvit", "advvit._compat", "advvit.attacks", "advvit.losses", "advvit.schedules")),
    # wrappers and weights are torch only, so the runtime layer and the evaluation runner can use
    # them without importing timm.
    # io is standard library only: data reads an ids file through it.
    ("models and data",
     ("advvit.models.*", "advvit.wrappers", "advvit.weights", "advvit.data", "advvit.io")),
    ("persistence and runtime",
     ("advvit.checkpoint", "advvit.config", "advvit.rundir", "advvit.accel",
      "advvit.compiled", "advvit.monitor", "advvit.checks")),
    ("library",
     ("advvit.engine", "advvit.robustness", "advvit.autoattack_adapter", "advvit.preflight",
      "advvit.analysis.*", "advvit.report", "advvit.attack_names", "advvit.suites", "advvit.plots",
      "advvit.trainer", "advvit.references", "advvit.leaderboard")),
    # cli holds the parts the command lines share (option groups, analyze's sub-commands); it is
    # no command itself, so findings may check options with its parsers.
    ("command lines",
     ("advvit.train", "advvit.eval", "advvit.analyze", "advvit.export", "advvit.findings.*",
      "advvit.cli.*", "advvit.launch")),
)

# Each is one command line; only its own modules may import it. The findings command line is
# its __main__: the package's other modules are the suite (plan, runner, job arrays), which launch
# submits as jobs.
COMMANDS = ("advvit.train", "advvit.eval", "advvit.analyze", "advvit.export",
            "advvit.findings.__main__", "advvit.launch")

# ---------------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    imported: str
    line: int


def find_modules(root: Path) -> Dict[str, Path]:
    """Every module of the ``advvit`` package under ``root``, by dotted name."""
    modules = {}
    for path in sorted((root / "advvit").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_advvit(name: str) -> bool:
    return name == "advvit" or name.startswith("advvit.")


def _package_of(module: str, modules: Mapping[str, Path]) -> str:
    return module if modules[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _relative(module: str, level: int, name: Optional[str], modules: Mapping[str, Path]) -> str:
    parts = _package_of(module, modules).split(".")
    base = ".".join(parts[:len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def _import_module_name(call: ast.Call) -> Optional[str]:
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")
    if named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def imports_of(module: str, modules: Mapping[str, Path]) -> Iterator[Import]:
    """The advvit modules ``module`` imports, wherever in it the import stands."""
    tree = ast.parse(modules[module].read_text(), str(modules[module]))
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _relative(module, node.level, node.module, modules) if node.level else node.module or ""
            # ``from package import name``: the submodule where there is one, else the package.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Call):
            literal = _import_module_name(node)
            if literal is not None:
                level = len(literal) - len(literal.lstrip("."))
                names = [_relative(module, level, literal.lstrip("."), modules) if level else literal]
        for imported in sorted({n for n in names if _is_advvit(n)}):
            yield Import(imported, node.lineno)


def _entry_covers(entry: str, module: str) -> bool:
    if entry.endswith(".*"):
        package = entry[:-2]
        return module == package or module.startswith(package + ".")
    return module == entry


def layer_of(module: str) -> Optional[int]:
    for index, (_, entries) in enumerate(LAYERS):
        if any(_entry_covers(e, module) for e in entries):
            return index
    return None


def command_of(module: str) -> Optional[str]:
    return next((c for c in COMMANDS if _entry_covers(c, module)), None)


def _cycles(graph: Mapping[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module, or a module importing itself."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check(root: Path) -> List[str]:
    """Every break of the layer rules in the advvit package under ``root``, one line each."""
    modules = find_modules(root)
    problems = [f"{m}: in no layer of LAYERS" for m in modules if layer_of(m) is None]
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module in modules:
        for imp in imports_of(module, modules):
            where = f"{module}:{imp.line} imports {imp.imported}"
            if imp.imported not in modules:
                problems.append(f"{where}, which does not exist")
                continue
            graph[module].add(imp.imported)
            mine, theirs = layer_of(module), layer_of(imp.imported)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{where}: layer {theirs} ({LAYERS[theirs][0]}) above its own, "
                                f"{mine} ({LAYERS[mine][0]})")
            command = command_of(imp.imported)
            if command is not None and command != command_of(module):
                problems.append(f"{where}: the command line {command} as a library")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


# ---------------------------------------------------------------------------------------------
# the rules, on the code
# ---------------------------------------------------------------------------------------------

def test_the_package_keeps_to_its_layers():
    assert check(REPO) == []


def test_the_runtime_layer_imports_no_timm():
    code = ("import sys, advvit.accel, advvit.engine; "
            "assert 'timm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('timm'))[:5]")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# the checker catches what it is for
# ---------------------------------------------------------------------------------------------

def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_reports_upward_imports_cycles_commands_and_unassigned_modules(tmp_path):
    root = _tree(tmp_path, {
        "advvit/__init__.py": "",
        "advvit/attacks.py": "from . import eval\n",
        "advvit/eval.py": "",
        "advvit/train.py": "",
        "advvit/rundir.py": "from .config import X\n",
        "advvit/config.py": "def load():\n    from advvit import rundir\n",
        "advvit/engine.py": "import importlib\n\ndef run():\n    return importlib.import_module('advvit.train')\n",
        "advvit/models/__init__.py": "",
        "advvit/models/thesis.py": "def f():\n    from ..checkpoint import load\n",
        "advvit/checkpoint.py": "",
        "advvit/stray.py": "",
        "advvit/schedules.py": "from .gone import thing\n",
    })
    problems = check(root)
    expected = [
        r"^advvit\.attacks:1 imports advvit\.eval: layer 4 .* above its own, 0",
        r"^advvit\.attacks:1 imports advvit\.eval: the command line advvit\.eval as a library",
        r"^advvit\.engine:4 imports advvit\.train: layer 4 .* above its own, 3",
        r"^advvit\.engine:4 imports advvit\.train: the command line advvit\.train as a library",
        r"^advvit\.models\.thesis:2 imports advvit\.checkpoint: layer 2 .* above its own, 1",
        r"^import cycle: advvit\.config -> advvit\.rundir$",
        r"^advvit\.stray: in no layer",
        r"^advvit\.schedules:1 imports advvit\.gone, which does not exist$",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    assert len(problems) == len(expected), problems


def test_the_checker_reports_an_import_planted_in_a_copy_of_the_package(tmp_path):
    shutil.copytree(REPO / "advvit", tmp_path / "advvit", ignore=shutil.ignore_patterns("__pycache__"))
    assert check(tmp_path) == []
    thesis = tmp_path / "advvit" / "models" / "thesis.py"
    thesis.write_text(thesis.read_text() + "\n\ndef _planted():\n    from .. import eval\n")
    problems = check(tmp_path)
    assert len(problems) == 3, problems
    assert problems[0].startswith("advvit.models.thesis:") and "above its own" in problems[0]
    assert problems[1].startswith("advvit.models.thesis:") and "as a library" in problems[1]
    # eval loads checkpoints, which build models: the planted import closes a loop through them.
    assert problems[2].startswith("import cycle: ") and "advvit.models.thesis" in problems[2]



# ---------------------------------------------------------------------------------------------
# docs/architecture.md: the module table's "imports" column, against the same scan
# ---------------------------------------------------------------------------------------------

ARCHITECTURE = REPO / "docs" / "architecture.md"

# The import names of the project's dependencies (and optional extras), as the column writes them
# after the advvit modules; any other word there is a misspelt module.
THIRD_PARTY = {"torch", "torchvision", "timm", "numpy", "yaml", "safetensors", "tensorboard", "PIL",
               "torch_xla", "matplotlib", "imagecorruptions", "pyautoattack", "autoattack",
               "submitit", "huggingface_hub", "robustbench", "wandb"}


@dataclass(frozen=True)
class Row:
    path: str  # as the table writes it: advvit/x.py, or advvit/pkg/ for a whole package
    imports: str

    @property
    def name(self) -> str:
        """The row's module as the column names it: ``models.fan``, ``advvit`` for the package."""
        parts = [p for p in self.path.removesuffix(".py").split("/") if p]
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts[1:]) or "advvit"

    def covers(self, path: str) -> bool:
        """Whether the module at ``path`` (relative to the repository) is this row's."""
        return path == self.path or (self.path.endswith("/") and path.startswith(self.path))


def module_table(text: str) -> List[Row]:
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`advvit/"):
            rows.append(Row(cells[0].strip("`"), cells[2]))
    return rows


def _items(cell: str) -> Iterator[str]:
    """The comma-separated entries of a cell, commas inside parentheses kept."""
    depth, start = 0, 0
    for i, ch in enumerate(cell + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            item = cell[start:i].strip()
            if item and item != "-":
                yield item
            start = i + 1


def _row_of(path: str, rows: Sequence[Row]) -> Optional[Row]:
    """A module's own row, else the row of the package folder it is in."""
    return min((r for r in rows if r.covers(path)), key=lambda r: r.path.endswith("/"), default=None)


def table_problems(text: str, root: Path = REPO) -> List[str]:
    """Where the module table of ``text`` differs from the code under ``root``, one line each."""
    modules, rows = find_modules(root), module_table(text)
    row_of = {m: _row_of(path.relative_to(root).as_posix(), rows) for m, path in modules.items()}
    names = {m: row.name for m, row in row_of.items() if row is not None}
    problems = [f"{m}: no row" for m, row in row_of.items() if row is None]
    problems += [f"{r.path}: no such module" for r in rows if r not in row_of.values()]
    for row in rows:
        real = {names.get(imp.imported, imp.imported) for m in modules if row_of[m] == row
                for imp in imports_of(m, modules)} - {row.name}
        words = [re.match(r"[\w.]+", item).group() for item in _items(row.imports)]
        written = {w for w in words if w in names.values()}
        unknown = [w for w in words if w not in written and w not in THIRD_PARTY]
        if written != real or unknown:
            problems.append(f"{row.path}: missing {sorted(real - written)}, not imported "
                            f"{sorted(written - real)}, unknown {unknown}")
    return problems


def test_the_architecture_table_has_every_module_and_its_real_imports():
    assert table_problems(ARCHITECTURE.read_text()) == []


def test_the_table_check_reports_a_wrong_row_a_missing_row_and_an_unknown_word():
    text = ARCHITECTURE.read_text()
    engine = next(r for r in module_table(text) if r.path == "advvit/engine.py")
    monitor = next(line for line in text.splitlines() if line.startswith("| `advvit/monitor.py` |"))
    text = text.replace(engine.imports, "losses, schedules, accel").replace(monitor + "\n", "")
    text = text.replace("| wrappers (`unwrap`), torch,", "| wrappers (`unwrap`), torhc,")
    assert table_problems(text) == [
        "advvit.monitor: no row",
        "advvit/accel.py: missing [], not imported [], unknown ['torhc']",
        "advvit/engine.py: missing ['attacks'], not imported ['losses'], unknown []",
        "advvit/trainer.py: missing ['advvit.monitor'], not imported [], unknown ['monitor']",
    ]
