"""What `mtl list` prints: the registered components, read without importing torch.

``mtl list KIND`` reads the built-in modules' source with ``ast`` (the ``@register_*("name")``
decorators and ``REGISTRY.register("name")(obj)`` calls, and each object's docstring), so it
answers in a fraction of a second instead of the seconds that importing torch, torchvision,
torchmetrics and wandb takes. A test checks that this index equals the live registries.
``mtl list KIND NAME`` imports the component for its full docstring and signature.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mtl.registry import PROJECT, ROOT, ComponentError, _inside_mtl, did_you_mean

@dataclass(frozen=True)
class Kind:
    registry: str  # "module:ATTR" of the live registry
    sources: tuple[str, ...]  # the source files that register the built-ins
    registrars: tuple[str, ...]  # the callables that register
    key: str  # where a config names one
    runtime: int = 0  # leading positional arguments the framework supplies (a head's input shape)


KINDS: dict[str, Kind] = {
    "tasks": Kind("mtl.task:TASKS", ("tasks/*.py",), ("register_task", "TASKS.register"), "tasks.<name>"),
    "trunks": Kind("mtl.trunks:TRUNKS", ("mtl/trunks/*.py",), ("register_trunk", "TRUNKS.register"), "trunk"),
    "heads": Kind("mtl.heads:HEADS", ("mtl/heads.py",), ("register_head", "HEADS.register"), "tasks.<name>.head", 2),
    "weightings": Kind("mtl.weighting:WEIGHTINGS", ("mtl/weighting/*.py",), ("register_weighting", "WEIGHTINGS.register"), "weighting", 1),
    "schedulers": Kind("mtl.scheduler:SCHEDULERS", ("mtl/scheduler.py",), ("register_scheduler", "SCHEDULERS.register"), "scheduler", 1),
    "recipes": Kind("mtl.recipes:RECIPES", ("mtl/recipes.py",), ("register_recipe", "RECIPES.register"), "recipe"),
    "architectures": Kind("mtl.architectures:ARCHITECTURES", ("mtl/model.py", "mtl/architectures/*.py"),
                          ("register_architecture", "ARCHITECTURES.register"), "architecture", 3),
    "optimizers": Kind("mtl.optim:OPTIMIZERS", ("mtl/optim.py",), ("OPTIMIZERS.register",), "trainer.optimizer", 1),
    "lr_schedules": Kind("mtl.optim:LR_SCHEDULES", ("mtl/optim.py",), ("LR_SCHEDULES.register",), "trainer.lr_schedule", 1),
    "scores": Kind("mtl.transferability:SCORES", ("mtl/transferability.py",), ("register_score", "SCORES.register"), "rank.scores[i]"),
    "merges": Kind("mtl.merging:MERGES", ("mtl/merging.py",), ("register_merge", "MERGES.register"), "compare.regimes.<label>.method"),
}


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line: the whole sentence, never cut at a line break."""
    paragraph = (inspect.cleandoc(doc or "").split("\n\n") or [""])[0]
    return " ".join(paragraph.split())


def external(obj: Any) -> bool:
    """Defined outside this project (torch.optim.SGD): its own documentation describes it."""
    return not _inside_mtl(obj)


def public_path(obj: Any) -> str:
    """The shortest module path that exports ``obj``: torch.optim.Adam, not torch.optim.adam.Adam."""
    parts = obj.__module__.split(".")
    for n in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:n]))
        if module is not None and getattr(module, obj.__qualname__, None) is obj:
            return f"{module.__name__}.{obj.__qualname__}"
    return f"{obj.__module__}.{obj.__qualname__}"


def describe(obj: Any) -> str:
    if external(obj):
        return f"{public_path(obj)} (see its documentation)"
    return summary(inspect.getdoc(obj))


def _registered_name(call: ast.expr, registrars: tuple[str, ...]) -> str | None:
    """``"x"`` for ``register_task("x")`` or ``TASKS.register("x")`` among ``registrars``."""
    if not isinstance(call, ast.Call) or not call.args or not isinstance(call.args[0], ast.Constant):
        return None
    return call.args[0].value if ast.unparse(call.func) in registrars else None


def _static_entries(path: Path, registrars: tuple[str, ...]) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rows = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            for deco in node.decorator_list:
                name = _registered_name(deco, registrars)
                if name is not None:
                    rows.append((name, summary(ast.get_docstring(node))))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Call):
            # REGISTRY.register("sgd")(torch.optim.SGD): an object defined elsewhere.
            name = _registered_name(node.func, registrars)
            if name is not None and node.args:
                target = ast.unparse(node.args[0])
                rows.append((name, target if target.split(".")[0] in PROJECT else f"{target} (see its documentation)"))
    return rows


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ComponentError(f"unknown kind {kind!r}.{did_you_mean(kind, KINDS)} Kinds: {', '.join(sorted(KINDS))}.")


def summaries(kind: str) -> list[tuple[str, str]]:
    """(name, summary) of every built-in component of ``kind``, sorted, from the source alone."""
    _check_kind(kind)
    rows: dict[str, str] = {}
    for pattern in KINDS[kind].sources:
        for path in sorted(ROOT.glob(pattern)):
            rows.update(_static_entries(path, KINDS[kind].registrars))
    return sorted(rows.items())


def registry(kind: str):
    _check_kind(kind)
    from mtl.registry import import_path

    return import_path(KINDS[kind].registry)


def _signature(builder: Callable[..., Any], runtime: int) -> list[str]:
    from mtl.registry import _parameters

    params = _parameters(builder) or []
    lines = []
    for p in params[runtime:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = "required" if p.default is p.empty else f"default {p.default!r}"
        hint = "" if p.annotation is p.empty else f": {p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, '__name__', p.annotation)}"
        lines.append(f"  {p.name}{hint}  ({default})")
    return lines


def explain(kind: str, name: str) -> str:
    """Everything ``mtl list KIND NAME`` prints: where it lives, its docstring (which cites its
    paper and formula), and its config arguments with their defaults."""
    reg = registry(kind)
    if name not in reg:
        raise ComponentError(f"no {reg.kind} named {name!r}.{did_you_mean(name, reg.names())} See `mtl list {kind}`.")
    builder = reg.get(name)
    where = public_path(builder) if external(builder) else f"{builder.__module__}:{builder.__qualname__}"
    doc = inspect.getdoc(builder) or "(no docstring)"
    if external(builder):
        doc = summary(doc)
    args = _signature(builder, KINDS[kind].runtime)
    key = KINDS[kind].key
    usage = f"Config arguments, set beside `{key}.name: {name}` (e.g. {key}.{args[0].split()[0].rstrip(':')}=...):" if args else "No config arguments."
    return "\n".join([f"{name}  ({reg.kind}, {where})", "", doc, "", usage, *args])
