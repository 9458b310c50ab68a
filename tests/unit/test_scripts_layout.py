"""scripts/ and benchmarks/: they import nemo_aot as installed (no import-path edits), use only
public names of other packages, and every documented ``python`` command names a file or module
that exists. Multi-module programs (the study, the step benchmark) are packages run with
``python -m`` from the repository root."""

import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TREES = ("scripts", "benchmarks")
# The docs whose commands must work as written (the first two are the programs' own READMEs).
DOCS = ("benchmarks/README.md", "scripts/experiments/README.md", "README.md", "docs/*.md")
# `python -m pkg.mod` or `python path/to/file.py`, possibly across a line break in prose.
COMMAND = re.compile(r"\bpython3?\s+(?:-m\s+(?P<module>[\w.<>]+)|(?P<path>[\w./<>-]+\.py)\b)")


def _files(suffix=""):
    for tree in TREES:
        for folder, dirs, names in os.walk(os.path.join(ROOT, tree)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            yield from (os.path.join(folder, n) for n in sorted(names) if n.endswith(suffix))


def _rel(path):
    return os.path.relpath(path, ROOT)


def _path_edits(tree):
    """Lines of code that change sys.path: sys.path.insert/append/extend/... calls, assignments."""
    def is_sys_path(node):
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and is_sys_path(node.func.value):
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    yield node.lineno, ast.unparse(node)


def test_no_import_path_edits():
    """Code, not text: a script may write a file for another process that does edit its path."""
    offenders = []
    for path in _files(".py"):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        offenders += [f"{_rel(path)}:{line}: {code}" for line, code in _path_edits(tree)]
    assert not offenders, ("nemo_aot is installed and these are packages run with python -m; "
                           "import instead of editing sys.path:\n" + "\n".join(offenders))


def _private_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = node.module.split(".") + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [part for a in node.names for part in a.name.split(".")]
        else:
            continue
        if any(n.startswith("_") and not n.startswith("__") for n in names):
            yield node.lineno, ast.unparse(node)


def test_no_private_imports_across_packages():
    offenders = []
    for path in _files(".py"):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        offenders += [f"{_rel(path)}:{line}: {code}" for line, code in _private_imports(tree)]
    assert not offenders, "make the name public where it is defined:\n" + "\n".join(offenders)


def _documented_commands():
    for pattern in DOCS:
        for doc in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(doc) as f:
                text = f.read()
            for match in COMMAND.finditer(text):
                target = match["module"] or match["path"]
                if "<" not in target:  # a template such as `python -m scripts.experiments.<module>`
                    yield _rel(doc), match["module"], match["path"]


def _module_exists(name):
    """A module in the repository runnable with -m from its root: a .py file or a package with a
    __main__.py, inside regular packages (each folder above it holds an __init__.py)."""
    parts = name.split(".")
    base = os.path.join(ROOT, *parts)
    if not os.path.isdir(os.path.join(ROOT, parts[0])) and not os.path.isfile(base + ".py"):
        return importlib.util.find_spec(name) is not None  # an installed third-party module
    runnable = os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))
    packages = all(os.path.isfile(os.path.join(ROOT, *parts[:i], "__init__.py"))
                   for i in range(1, len(parts)))
    return runnable and packages


def _file_runs_by_path(path):
    """A file exists and imports no sibling relatively (run by its path it has no package)."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_documented_commands_name_existing_files_and_modules():
    commands = list(_documented_commands())
    for doc in DOCS[:2]:
        assert any(d == doc for d, _, _ in commands), f"no python command found in {doc}"
    missing = [f"{doc}: python -m {module}" for doc, module, _ in commands
               if module and not _module_exists(module)]
    missing += [f"{doc}: python {path}" for doc, _, path in commands
                if path and not _file_runs_by_path(os.path.join(ROOT, path))]
    assert not missing, "documented commands that cannot run as written:\n" + "\n".join(missing)


def test_packages_import_from_the_repository_root():
    """Relative imports inside the study and the benchmark resolve (what ``python -m`` needs)."""
    modules = [f"scripts.experiments.{m}" for m in
               ("common", "report", "sft_reference", "build_preferences", "make_demo_policy",
                "run_study")] + ["benchmarks.aot_step.__main__"]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)" % modules
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
