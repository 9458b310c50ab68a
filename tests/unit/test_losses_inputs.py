"""Bad inputs raise a ValueError that names the argument; losses/ stays pure torch."""

import ast
import math
import pathlib

import pytest
import torch

import nemo_aot.losses
from nemo_aot.losses import preference_loss


def _ok(n=4, m=None):
    m = n if m is None else m
    return [torch.randn(n), torch.randn(m), torch.randn(n), torch.randn(m)]


def _call(tensors, **kw):
    kw = {"loss_type": "aot_paired", "beta": 0.1, **kw}
    return preference_loss(*tensors, **kw)


@pytest.mark.parametrize("loss_type", ["aot_paired", "dpo", "ipo"])
def test_paired_loss_types_need_equal_lengths(loss_type):
    with pytest.raises(ValueError,
                       match="policy_rejected_logps has 3 entries but policy_chosen_logps has 4"):
        _call(_ok(4, 3), loss_type=loss_type)
    t = _ok(4)
    t[2] = torch.randn(5)
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        _call(t, loss_type=loss_type)


def test_unpaired_allows_unequal_sides_but_needs_a_reference_per_policy_logp():
    _call(_ok(4, 3), loss_type="aot_unpaired")
    t = _ok(4, 3)
    t[3] = torch.randn(4)
    with pytest.raises(ValueError, match="reference_rejected_logps has 4 entries but "
                                         "policy_rejected_logps has 3"):
        _call(t, loss_type="aot_unpaired")


@pytest.mark.parametrize("which", range(4))
def test_non_1d_is_refused(which):
    t = _ok(4)
    t[which] = t[which].reshape(2, 2)
    with pytest.raises(ValueError, match=f"{_names()[which]} must be 1-D"):
        _call(t)


def test_integer_and_non_tensor_inputs():
    t = _ok(4)
    t[0] = torch.arange(4)
    with pytest.raises(ValueError, match="policy_chosen_logps must be a floating-point"):
        _call(t)
    t[0] = [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        _call(t)


@pytest.mark.parametrize("which", range(4))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(which, bad):
    t = _ok(4)
    t[which][1] = bad
    with pytest.raises(ValueError, match=f"{_names()[which]} contain NaN or Inf"):
        _call(t)
    _call(t, check_finite=False)          # the check can be skipped (no host sync)


@pytest.mark.parametrize("loss_type", ["aot_paired", "aot_unpaired", "dpo", "ipo"])
def test_empty_is_refused(loss_type):
    with pytest.raises(ValueError, match="policy_chosen_logps is empty"):
        _call(_ok(0), loss_type=loss_type)
    if loss_type == "aot_unpaired":
        with pytest.raises(ValueError, match="policy_rejected_logps is empty"):
            _call(_ok(3, 0), loss_type=loss_type)


@pytest.mark.parametrize("kw,match", [
    ({"loss_type": "sigmoid"}, "loss_type must be one of"),
    ({"loss_type": "aot"}, "loss_type must be one of"),
    ({"surrogate": "exponential"}, "surrogate must be one of"),
    ({"loss_type": "ipo", "surrogate": "hinge"}, "surrogate does not apply"),
    ({"beta": 0.0}, "beta must be"),
    ({"beta": -0.1}, "beta must be"),
    ({"beta": math.nan}, "beta must be"),
    ({"beta": True}, "beta must be"),
    ({"label_smoothing": -0.1}, "label_smoothing must be"),
    ({"label_smoothing": 0.5}, "label_smoothing must be"),
    ({"label_smoothing": 0.1, "surrogate": "hinge"}, "label_smoothing .* logistic"),
    ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing .* logistic"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        _call(_ok(4), **kw)


def _names():
    return ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
            "reference_rejected_logps")


FORBIDDEN = ("torch.distributed", "megatron", "nemo.", "transformer_engine", "apex",
             "nemo_aot.distributed", "nemo_aot.models", "nemo_aot.algorithms")


def test_losses_package_imports_only_pure_torch():
    root = pathlib.Path(nemo_aot.losses.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not any(name == f.rstrip(".") or name.startswith(f)
                               or name.startswith(f + ".")
                               for f in FORBIDDEN), f"{path.name} imports {name}"
