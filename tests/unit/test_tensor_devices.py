"""A static guard for a class of GPU-only crashes no CPU test can see: a tensor made on the host
inside per-step code and then mixed with CUDA tensors ("expected device cuda:0 but got cpu").
On CPU every tensor shares one device, so such a line passes every other test.

Every call of a torch tensor factory in the per-step packages (models, losses, distributed,
algorithms) must name its ``device=``, unless it is on the allow-list below, each entry with the
reason the tensor is meant to live on the host.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("nemo_aot/models", "nemo_aot/losses", "nemo_aot/distributed", "nemo_aot/algorithms")
FACTORIES = {"arange", "as_tensor", "empty", "empty_strided", "eye", "from_numpy", "frombuffer",
             "full", "linspace", "logspace", "ones", "rand", "randint", "randn", "randperm",
             "tensor", "zeros"}
# (file, enclosing function, factory): why the tensor belongs on the host.
ALLOWED = {
    ("nemo_aot/algorithms/objective.py", "PreferenceObjective._reduce_metrics", "zeros"):
        "collected per-sample rewards are plot data, gathered as host objects",
    ("nemo_aot/algorithms/objective.py", "finalize_sums", "tensor"):
        "host floats after the step's one device->host copy",
    ("nemo_aot/models/dist_weights.py", "_prepare_request", "empty"):
        "a checkpoint read buffer: whole vocabulary tables are read on the host and re-padded",
    ("nemo_aot/models/family_options.py", "rope_inv_freq", "arange"):
        "at construction only: a non-persistent buffer that moves with the module",
    ("nemo_aot/models/reference.py", "ReferenceTable.__init__", "full"):
        "the cached reference table is a host table (looked up on the host per batch)",
    ("nemo_aot/models/reference.py", "ReferenceTable.__init__", "zeros"):
        "the cached reference table is a host table",
    ("nemo_aot/models/reference.py", "ReferenceTable.lookup", "zeros"):
        "host lookup; the batch carries it to the device with its other tensors",
    ("nemo_aot/models/reference.py", "_gather_scores", "zeros"):
        "scores are gathered as host objects for the host table",
    ("nemo_aot/distributed/ranks.py", "_broadcast", "frombuffer"):
        "a host byte buffer, copied to the group's device right after",
    ("nemo_aot/algorithms/trainer.py", "AOTTrainer.validate", "zeros"):
        "validation rewards are plot data on the host",
}


def _factory_calls(root=ROOT):
    """(file, enclosing function, factory, line) of every torch factory call without device=."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            rel = str(path.relative_to(root))
            tree = ast.parse(path.read_text())
            for scope, node in _walk(tree, ""):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in FACTORIES
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and not any(k.arg == "device" for k in node.keywords)):
                    found.append((rel, scope, node.func.attr, node.lineno))
    return found


def _walk(node, scope):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.ClassDef) or not scope or "." not in scope:
                yield from _walk(child, inner)
            else:  # nested functions report as their enclosing function
                yield from _walk(child, scope)
        else:
            yield scope, child
            yield from _walk(child, scope)


def test_every_tensor_factory_in_per_step_code_names_its_device():
    offending = [f"{f}:{line} torch.{name}(...) in {scope or '<module>'}"
                 for f, scope, name, line in _factory_calls() if (f, scope, name) not in ALLOWED]
    assert not offending, ("tensor factories without device= (pass device=<a tensor>.device, or "
                           "add the line to ALLOWED with the reason it lives on the host):\n"
                           + "\n".join(offending))


def test_the_allow_list_has_no_stale_entries():
    used = {(f, scope, name) for f, scope, name, _ in _factory_calls()}
    assert not set(ALLOWED) - used, sorted(set(ALLOWED) - used)


@pytest.mark.parametrize("code, bad", [
    ("import torch\ndef step(u):\n    return torch.arange(u.numel())\n", True),
    ("import torch\ndef step(u):\n    return torch.arange(u.numel(), device=u.device)\n", False),
    ("import torch\ndef step(u):\n    return torch.zeros_like(u)\n", False),
])
def test_the_guard_sees_a_host_factory(code, bad, tmp_path):
    package = tmp_path / "nemo_aot" / "models"
    package.mkdir(parents=True)
    (package / "step.py").write_text(code)
    assert bool(_factory_calls(tmp_path)) == bad
