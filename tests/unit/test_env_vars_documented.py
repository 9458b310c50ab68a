"""Every environment variable nemo_aot reads is in README.md's "Environment variables" table.

The reads are found by parsing nemo_aot/ (no import): ``os.environ.get("X")``,
``os.environ["X"]``, ``"X" in os.environ``, ``os.getenv("X")``, the same on a mapping named
``env``/``environ`` (the launcher's injectable environment), and helpers called with such a
mapping first (``_int(env, "SLURM_PROCID")``). A name may be a literal or a module-level
constant (``EXTRACT_DIR_ENV = "NEMO_AOT_EXTRACT_DIR"``). A variable added later without a row
fails here.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "nemo_aot")
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAPPING_NAMES = {"env", "environ"}


def _is_environment(node) -> bool:
    """``os.environ``, or a name the code uses for an environment mapping."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id in MAPPING_NAMES


def _module_constants(tree: ast.Module) -> dict:
    """Module-level ``NAME = "TEXT"`` and ``NAME = ("A", "B")`` assignments."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, str):
                constants[node.targets[0].id] = (value,)
            elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                constants[node.targets[0].id] = value
    return constants


def _names(node, constants: dict) -> tuple:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.Name):
        return constants.get(node.id, ())
    return ()


def _read_names(node, constants: dict):
    """Names of environment variables this AST node reads."""
    if isinstance(node, ast.Call):
        func, args = node.func, node.args
        if isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") and \
                _is_environment(func.value) and args:
            yield from _names(args[0], constants)
        elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or \
                (isinstance(func, ast.Name) and func.id == "getenv"):
            if args:
                yield from _names(args[0], constants)
        elif args and _is_environment(args[0]):  # helpers: _int(env, "X"), _first(env, "A", "B")
            for arg in args[1:]:
                yield from _names(arg, constants)
    elif isinstance(node, ast.Subscript) and _is_environment(node.value):
        yield from _names(node.slice, constants)
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and \
            isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_environment(node.comparators[0]):
        yield from _names(node.left, constants)


def variables_read() -> dict:
    """Variable name -> the files (relative) that read it."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            constants = _module_constants(tree)
            for node in ast.walk(tree):
                for var in _read_names(node, constants):
                    if ENV_NAME.match(var):
                        found.setdefault(var, set()).add(os.path.relpath(path, ROOT))
    return found


def documented_variables() -> set:
    """Backticked names in the first column of README.md's "Environment variables" table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"^## Environment variables\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Environment variables' section"
    names = set()
    for line in match.group(1).splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1]))
    return names


def test_the_scanner_sees_known_reads():
    """Guards the guard: reads of each shape the scanner claims to see are found."""
    found = variables_read()
    for var in ("NEMO_AOT_LOG_LEVEL",  # env.get("...") in progress.py
                "RANK",  # os.environ.get
                "SLURM_PROCID",  # _int(env, "...") in the launcher
                "SLURM_JOB_NODELIST",  # _first(env, A, B, C)
                "TORCHELASTIC_RUN_ID",  # "..." in env
                "LOCAL_WORLD_SIZE"):  # "..." not in os.environ
        assert var in found, f"{var} not found; the scanner missed a read shape"


def test_every_variable_read_is_documented():
    found, documented = variables_read(), documented_variables()
    missing = {var: sorted(files) for var, files in found.items() if var not in documented}
    assert not missing, (
        "environment variables read by nemo_aot but missing from README.md's 'Environment "
        f"variables' table (add a row: variable, read by, meaning, default): {missing}")


def test_cli_help_points_at_the_variables():
    from nemo_aot.cli import _build_parser

    text = _build_parser().format_help()
    for var in ("NEMO_AOT_LOG_LEVEL", "NEMO_AOT_EXTRACT_DIR", "Environment variables"):
        assert var in text
