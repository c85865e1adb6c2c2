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
    split_call,
    with_model_args,
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


# -- bytecode --------------------------------------------------------------------------------------
def test_loading_a_file_writes_no_bytecode(tmp_path, monkeypatch):
    """A user's machine writes __pycache__ by default; loading their model must not."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    (tmp_path / "neighbour_for_bytecode_test.py").write_text("WIDTH = 3\n")
    path = write(
        tmp_path,
        """
        from neighbour_for_bytecode_test import WIDTH

        def build_model():
            import neighbour_lazy_for_bytecode_test  # imported while the model is built
            return nn.Linear(WIDTH, neighbour_lazy_for_bytecode_test.OUT)
        """,
    )
    (tmp_path / "neighbour_lazy_for_bytecode_test.py").write_text("OUT = 2\n")
    try:
        loaded = load_target(path)
    finally:
        for name in ("neighbour_for_bytecode_test", "neighbour_lazy_for_bytecode_test"):
            sys.modules.pop(name, None)
    assert loaded.model.out_features == 2
    assert sys.dont_write_bytecode is False  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.py", "neighbour_for_bytecode_test.py", "neighbour_lazy_for_bytecode_test.py"
    ]  # fmt: skip


# -- arguments of NAME -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, expected",
    [
        ("m.py:Net(depth=4)", ("file", "m.py", "Net(depth=4)")),
        ("torchvision.models:vit_b_16(image_size=96)",
         ("module", "torchvision.models", "vit_b_16(image_size=96)")),
        ('m.py:f(name="a:b(c)")', ("file", "m.py", 'f(name="a:b(c)")')),
        ("C:\\models\\m.py:Net(2)", ("file", "C:\\models\\m.py", "Net(2)")),
    ],
)  # fmt: skip
def test_parse_target_with_arguments(target, expected):
    assert parse_target(target) == expected


def test_split_call_reads_literals_only():
    assert split_call("Net(3, widths=(16, 32), act='relu', extra=None)") == (
        "Net", (3,), {"widths": (16, 32), "act": "relu", "extra": None}
    )  # fmt: skip
    for bad, words in [
        ("Net(depth=os.sep)", "os.sep is not a literal"),
        ("Net(depth=__import__('os'))", "__import__('os') is not a literal"),
        ("Net(*xs)", "*args cannot be given"),
        ("Net(**kw)", "**kwargs cannot be given"),
        ("Net(depth=", "cannot read the arguments of 'Net(depth='"),
    ]:
        with pytest.raises(TargetError) as info:
            split_call(bad)
        assert words in str(info.value) and "\n" not in str(info.value)


NEEDS_ARGS = """
class Net(nn.Module):
    def __init__(self, depth, width=4):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
    def forward(self, x):
        for f in self.fs:
            x = x + f(x)
        return x
"""


def test_arguments_reach_a_class_or_factory(tmp_path):
    path = write(tmp_path, NEEDS_ARGS)
    loaded = load_target(f"{path}:Net(3, width=8)")
    assert len(loaded.model.fs) == 3 and loaded.model.fs[0].in_features == 8
    assert loaded.how == "class Net(3, width=8)" and loaded.name == "Net"
    assert loaded.target == f"{path}:Net(3, width=8)"
    net = load_target("torchvision.models:resnet18(num_classes=7)")
    assert net.model.fc.out_features == 7 and net.how == "factory resnet18(num_classes=7)"
    with pytest.raises(ModelNotFoundError) as info:
        load_target(f"{path}:Net(3, depth=2)")
    assert str(info.value) == (
        f"Net(3, depth=2) in {path}: multiple values for argument 'depth'; check the arguments"
    )
    assert with_model_args(f"{path}:Net", "depth=2") == f"{path}:Net(depth=2)"
    with pytest.raises(TargetError, match="--model-args needs the class or factory named"):
        with_model_args(path, "depth=2")


def test_a_class_that_needs_arguments_is_named(tmp_path):
    path = write(tmp_path, NEEDS_ARGS)
    with pytest.raises(ModelNotFoundError) as info:
        load_target(path)
    assert str(info.value) == (
        f"no model found in {path} that builds without arguments: class Net needs arguments "
        f"(depth); pass them as {path}:Net(depth=...) (or --model-args 'depth=...'), give them "
        f"defaults, or define `model = Net(...)`"
    )


# -- errors that fit the model ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, hint",
    [
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), "--input-shape 1,16 --dtype int64"),
        (nn.Sequential(nn.Conv2d(1, 4, 3)), "--input-shape 1,1,224,224"),
        (nn.Sequential(nn.Conv1d(2, 4, 3)), "--input-shape 1,2,128"),
        (nn.Sequential(nn.Flatten(), nn.Linear(6, 2)), "--input-shape 1,6"),
        (nn.Transformer(16, 2, 1, 1, 32), "--input-shape 1,16,16"),
        (nn.ReLU(), "--input-shape 1,3,224,224"),
    ],
)
def test_input_shape_hint(model, hint):
    assert inputs.input_shape_hint(model) == hint


def test_a_token_model_on_image_inputs_gets_a_token_hint_and_the_line(tmp_path):
    path = write(
        tmp_path,
        """
        class Tok(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(100, 8)
                self.f = nn.Linear(8, 8)
            def forward(self, ids):
                x = self.emb(ids)
                return x + self.f(x)
        """,
    )
    with pytest.raises(ExampleInputsError) as info:
        load_target(path, input_shapes=[(1, 3, 8, 8)], check_inputs=True)
    msg = str(info.value)
    assert msg.endswith(" at model.py:10; give inputs the model accepts, e.g. --input-shape 1,16 "
                        "--dtype int64")  # fmt: skip
    assert load_target(path, input_shapes=[(1, 16)], dtypes=torch.int64, check_inputs=True)


def test_an_exception_in_forward_names_the_line(tmp_path):
    path = write(
        tmp_path,
        """
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.f = nn.Linear(3, 3)
            def forward(self, x):
                if x.shape[0] == 3:
                    raise ValueError("batch 3 is unlucky")
                return x + self.f(x)
        """,
    )
    with pytest.raises(ExampleInputsError) as info:
        load_target(path, input_shapes=[(3, 3)], check_inputs=True)
    assert str(info.value) == (
        "the model fails on example inputs of shape 3x3 float32 (from --input-shape): "
        "ValueError: batch 3 is unlucky at model.py:10; give inputs the model accepts, "
        "e.g. --input-shape 1,3"
    )
    with pytest.raises(ExampleInputsError, match=r"at vision_transformer\.py:"):  # not torch's
        load_target("torchvision.models:vit_b_16", input_shapes=[(1, 3, 64, 64)],
                    check_inputs=True)  # fmt: skip
