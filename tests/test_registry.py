import pytest
import torch

from mtl.heads import HEADS, Head
from mtl.registry import ComponentError, Registry, bind_kwargs, build, import_path


class Base:
    pass


def test_duplicate_names_are_rejected():
    reg = Registry("thing", Base)

    @reg.register("a")
    class A(Base):
        pass

    with pytest.raises(ComponentError, match="registered twice"):

        @reg.register("a")
        class B(Base):
            pass


def test_base_class_is_enforced():
    reg = Registry("thing", Base)
    with pytest.raises(ComponentError, match="must subclass Base"):

        @reg.register("x")
        class NotABase:
            pass


def test_unknown_name_lists_close_and_available_names():
    with pytest.raises(ComponentError) as e:
        HEADS.get("lineer")
    assert "Did you mean 'linear'" in str(e.value)
    assert "Available: dense, linear, mlp" in str(e.value)


def test_import_path_resolves_both_spellings():
    assert import_path("mtl.heads:LinearHead") is import_path("mtl.heads.LinearHead")
    assert HEADS.get("mtl.heads:MLPHead").__name__ == "MLPHead"
    with pytest.raises(ComponentError, match="no attribute 'LinerHead'. Did you mean 'LinearHead'"):
        import_path("mtl.heads:LinerHead")
    with pytest.raises(ComponentError, match="cannot import module"):
        import_path("no_such_module_xyz:Thing")


def test_import_path_must_subclass_the_base():
    with pytest.raises(ComponentError, match="must subclass Head"):
        HEADS.get("torch.nn:Linear")


def test_bind_kwargs_names_unknown_and_missing_arguments():
    def f(shape, num, hidden=3, *, dropout=0.0):
        return None

    bind_kwargs(f, {"hidden": 4, "dropout": 0.1}, "x", skip=2)
    with pytest.raises(ComponentError, match=r"x.hiden: unknown argument .* Did you mean 'hidden'"):
        bind_kwargs(f, {"hiden": 4}, "x", skip=2)
    with pytest.raises(ComponentError, match="x.num: required argument is missing"):
        bind_kwargs(f, {}, "x", skip=1)


def test_bind_kwargs_refuses_a_bool_for_a_number():
    def f(size: int = 28, scale: float = 1.0, flag: bool = False):
        return None

    bind_kwargs(f, {"size": 8, "scale": 2, "flag": True}, "x")
    with pytest.raises(ComponentError, match=r"x.size: expected int, got True \(bool\)"):
        bind_kwargs(f, {"size": True}, "x")
    with pytest.raises(ComponentError, match=r"x.scale: expected int or float, got False \(bool\)"):
        bind_kwargs(f, {"scale": False}, "x")


def test_build_passes_runtime_arguments_positionally():
    head = build(HEADS, {"name": "mlp", "hidden": [7]}, "tasks.t.head", (5,), 3)
    assert isinstance(head, Head)
    assert head(torch.zeros(2, 5)).shape == (2, 3)
    with pytest.raises(ComponentError, match="tasks.t.head.name is missing"):
        build(HEADS, {}, "tasks.t.head", (5,), 3)
