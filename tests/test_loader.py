"""Tests of fxmomentum.tools.loader: targets, the model-finding rules, example inputs, errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from fxmomentum.tools import inputs
from fxmomentum.tools.inputs import make_example_inputs, parse_dtype, parse_shape
from fxmomentum.tools.loader import (
    AmbiguousModelError,
    ExampleInputsError,
    ModelNotFoundError,
    TargetError,
    load_target,
    parse_target,
)

HEADER = "import torch\nfrom torch import nn\n"


def write(tmp_path, text: str, name: str = "model.py") -> str:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(text))
    return str(path)


# -- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, expected",
    [
        ("model.py", ("file", "model.py", None)),
        ("model.py:Net", ("file", "model.py", "Net")),
        ("dir/model.py:a.b", ("file", "dir/model.py", "a.b")),
        ("torchvision.models:resnet50", ("module", "torchvision.models", "resnet50")),
        ("torchvision.models", ("module", "torchvision.models", None)),
        ("C:\\models\\model.py", ("file", "C:\\models\\model.py", None)),
    ],
)
def test_parse_target(target, expected):
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", ["", "not a module!", "foo-bar"])
def test_parse_target_rejects_garbage(target):
    with pytest.raises(TargetError):
        parse_target(target)


def test_file_is_loaded_under_a_unique_name_with_its_directory_on_sys_path(tmp_path):
    (tmp_path / "helper_mod_for_loader_test.py").write_text("WIDTH = 5\n")
    path = write(
        tmp_path,
        """
        from helper_mod_for_loader_test import WIDTH
        model = nn.Linear(WIDTH, 2)
        """,
    )
    a = load_target(path)
    b = load_target(path)
    assert a.module.__name__ != b.module.__name__
    assert a.module.__name__.startswith("fxmomentum_target_model_")
    assert a.model.in_features == 5
    assert str(tmp_path) not in sys.path
    assert a.model is not b.model


# -- rules -----------------------------------------------------------------------------------------
def test_rule_1_instance_named_model_wins(tmp_path):
    path = write(
        tmp_path,
        """
        other = nn.Linear(3, 3)
        model = nn.Linear(2, 2)
        def build_model():
            return nn.Linear(4, 4)
        """,
    )
    loaded = load_target(path)
    assert loaded.name == "model" and loaded.model.in_features == 2
    assert "instance" in loaded.how


def test_rule_2_factory(tmp_path):
    path = write(
        tmp_path,
        """
        other = nn.Linear(3, 3)
        def get_model(width=6):
            return nn.Linear(width, 2)
        """,
    )
    loaded = load_target(path)
    assert loaded.name == "get_model" and loaded.model.in_features == 6
    assert loaded.how == "factory get_model()"


def test_rule_2_several_factories_are_ambiguous(tmp_path):
    path = write(
        tmp_path,
        """
        def build_model():
            return nn.Linear(2, 2)
        def create_model():
            return nn.Linear(2, 2)
        """,
    )
    with pytest.raises(AmbiguousModelError) as info:
        load_target(path)
    assert info.value.candidates == ["build_model", "create_model"]
    assert ":NAME" in str(info.value) and info.value.exit_code == 4


def test_rule_3_only_instance(tmp_path):
    path = write(
        tmp_path,
        """
        net = nn.Linear(3, 1)
        alias = net
        class Net(nn.Module):
            def forward(self, x):
                return x
        """,
    )
    loaded = load_target(path)
    assert loaded.name == "net" and loaded.model.in_features == 3


def test_rule_3_several_instances_are_ambiguous(tmp_path):
    path = write(tmp_path, "a = nn.Linear(2, 2)\nb = nn.ReLU()\n")
    with pytest.raises(AmbiguousModelError) as info:
        load_target(path)
    assert info.value.candidates == ["a", "b"]
    assert "model.py:NAME" in str(info.value)


def test_rule_4_only_buildable_class_defined_in_the_file(tmp_path):
    path = write(
        tmp_path,
        """
        from torch.nn import Linear  # imported classes do not count
        class Block(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.fc = nn.Linear(width, width)
            def forward(self, x):
                return x + self.fc(x)
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.block = Block(width)
            def forward(self, x):
                return self.block(x)
        """,
    )
    loaded = load_target(path)
    assert loaded.name == "Net" and type(loaded.model).__name__ == "Net"
    assert loaded.how == "class Net()"


def test_rule_4_several_classes_are_ambiguous(tmp_path):
    path = write(
        tmp_path,
        """
        class A(nn.Module):
            def forward(self, x):
                return x
        class B(nn.Module):
            def forward(self, x):
                return x
        """,
    )
    with pytest.raises(AmbiguousModelError) as info:
        load_target(path)
    assert info.value.candidates == ["A", "B"]


def test_nothing_model_like(tmp_path):
    path = write(tmp_path, "x = 3\ndef helper():\n    return 1\n")
    with pytest.raises(ModelNotFoundError) as info:
        load_target(path)
    assert not isinstance(info.value, AmbiguousModelError)
    assert "build_model" in str(info.value) and ":NAME" in str(info.value)


# -- :NAME -----------------------------------------------------------------------------------------
SEVERAL = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
    def forward(self, x):
        return self.fc(x)
class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()
def factory():
    return nn.Linear(7, 1)
def not_a_model():
    return 3
instance = nn.Linear(5, 1)
number = 3
"""


@pytest.mark.parametrize(
    "name, check",
    [
        ("Net", lambda m: type(m).__name__ == "Net"),
        ("factory", lambda m: m.in_features == 7),
        ("instance", lambda m: m.in_features == 5),
    ],
)
def test_name_picks_instance_class_or_factory(tmp_path, name, check):
    loaded = load_target(write(tmp_path, SEVERAL) + ":" + name)
    assert loaded.name == name and check(loaded.model)


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing", "no attribute 'missing'"),
        ("NeedsArgs", "needs arguments (width)"),
        ("not_a_model", "returned int"),
        ("number", "is an int"),
    ],
)
def test_name_errors(tmp_path, name, words):
    with pytest.raises(ModelNotFoundError) as info:
        load_target(write(tmp_path, SEVERAL) + ":" + name)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_importable_target():
    loaded = load_target("torchvision.models:resnet18")
    assert type(loaded.model).__name__ == "ResNet"
    assert loaded.example_inputs is None and loaded.inputs_from is None


def test_importable_module_without_name_finds_nothing():
    with pytest.raises(ModelNotFoundError):
        load_target("torchvision.models")


# -- import errors ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(TargetError) as info:
        load_target(str(tmp_path / "nope.py"))
    assert "file not found" in str(info.value) and info.value.exit_code == 3


def test_missing_module():
    with pytest.raises(TargetError) as info:
        load_target("no_such_package_xyz.models:net")
    assert "cannot import module" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(TargetError, match="is a directory"):
        load_target(str(tmp_path) + "/")


def test_syntax_error(tmp_path):
    path = write(tmp_path, "model = nn.Linear(2, 2\n")
    with pytest.raises(TargetError) as info:
        load_target(path)
    assert "syntax error in" in str(info.value) and "model.py:" in str(info.value)
    assert not any(k.startswith("fxmomentum_target_") and "syntax" in k for k in sys.modules)


def test_exception_while_running_the_file(tmp_path):
    path = write(tmp_path, "\n\nx = 1 / 0\n")
    with pytest.raises(TargetError) as info:
        load_target(path)
    msg = str(info.value)
    assert "ZeroDivisionError" in msg and "model.py:5" in msg and "\n" not in msg


def test_exception_in_factory(tmp_path):
    path = write(tmp_path, "def build_model():\n    raise RuntimeError('boom')\n")
    with pytest.raises(TargetError) as info:
        load_target(path)
    assert "build_model() raised RuntimeError: boom at model.py:4" in str(info.value)


# -- example inputs --------------------------------------------------------------------------------
def test_parse_shape_and_dtype():
    assert parse_shape("2,3,224,224") == (2, 3, 224, 224)
    assert parse_shape(" 4x8 ") == (4, 8)
    assert parse_shape("7") == (7,)
    for bad in ("a,b", "2,,3", "0,3", "-1"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("int64") is torch.int64
    with pytest.raises(ValueError):
        parse_dtype("float33")
    with pytest.raises(ValueError):
        parse_dtype("nn")


def test_make_example_inputs():
    a, b = make_example_inputs([(2, 3), (5,)], [torch.float64, torch.int64])
    assert a.dtype is torch.float64 and a.shape == (2, 3)
    assert b.dtype is torch.int64 and not b.any()
    (c,) = make_example_inputs([(2, 3)])
    assert c.dtype is torch.float32 and torch.equal(c, make_example_inputs([(2, 3)])[0])
    assert [t.dtype for t in make_example_inputs([(1,), (1,)], [torch.float16])] == [
        torch.float16
    ] * 2
    with pytest.raises(ExampleInputsError):
        make_example_inputs([(1,), (1,), (1,)], [torch.float16, torch.float32])


@pytest.mark.parametrize(
    "text, n",
    [
        ("example_inputs = torch.randn(2, 3)", 1),
        ("example_inputs = (torch.randn(2, 3), torch.randn(2, 3))", 2),
        ("def example_inputs():\n    return torch.randn(2, 3)", 1),
        ("example_inputs = lambda: [torch.randn(2, 3)]", 1),
    ],
)
def test_example_inputs_from_the_file(tmp_path, text, n):
    path = write(tmp_path, "model = nn.Linear(3, 3)\n" + text + "\n")
    loaded = load_target(path, check_inputs=n == 1)
    assert len(loaded.example_inputs) == n
    assert loaded.inputs_from == f"example_inputs in {path}"


def test_input_shapes_replace_the_files(tmp_path):
    path = write(tmp_path, "model = nn.Linear(3, 3)\nexample_inputs = torch.randn(2, 3)\n")
    loaded = load_target(path, input_shapes=[(4, 3)], dtypes=torch.float64)
    (x,) = loaded.example_inputs
    assert x.shape == (4, 3) and x.dtype is torch.float64
    assert loaded.inputs_from == "--input-shape"


@pytest.mark.parametrize(
    "text, words",
    [
        ("example_inputs = 3", "is an int"),
        ("example_inputs = (torch.randn(2, 3), 'x')", "tuple of str, Tensor"),
        ("def example_inputs(n):\n    return torch.randn(n, 3)", "needs arguments (n)"),
        ("def example_inputs():\n    raise ValueError('bad')", "ValueError: bad"),
    ],
)
def test_bad_example_inputs_in_the_file(tmp_path, text, words):
    path = write(tmp_path, "model = nn.Linear(3, 3)\n" + text + "\n")
    with pytest.raises(ExampleInputsError) as info:
        load_target(path)
    assert words in str(info.value) and info.value.exit_code == 6


def test_wrong_shape_is_caught_and_state_is_kept(tmp_path):
    path = write(
        tmp_path,
        "model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))\n"
        "example_inputs = torch.randn(2, 4)\n",
    )
    loaded = load_target(path)  # not checked: loads
    assert loaded.model.training
    with pytest.raises(ExampleInputsError) as info:
        load_target(path, check_inputs=True)
    msg = str(info.value)
    assert "2x4 float32" in msg and "--input-shape" in msg and "\n" not in msg
    ok = load_target(path, input_shapes=[(5, 3)], check_inputs=True)
    assert ok.model.training and ok.model[1].num_batches_tracked.item() == 0


def test_check_example_inputs_restores_modes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model[1].eval()
    inputs.check_example_inputs(model, (torch.randn(1, 2),))
    assert model.training and model[0].training and not model[1].training
