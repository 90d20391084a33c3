"""One generic registry for tasks, trunks, heads, weightings, schedulers and transferability scores.

A component is named in a config either by its registered name or by an import path
(``package.module:Name`` or ``package.module.Name``), so a user's own class needs no edit
of the library.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, TypeVar

T = TypeVar("T")

# The folder that holds the packages mtl/ and tasks/ (the repository, or site-packages).
ROOT = Path(__file__).resolve().parent.parent


class ComponentError(ValueError):
    """A component name or its arguments cannot be resolved; the message names the fix."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    near = closest(name, candidates)
    return f" Did you mean {' or '.join(repr(c) for c in near)}?" if near else ""


def import_path(path: str) -> Any:
    """Resolve ``pkg.mod:Name`` or ``pkg.mod.Name`` to the object it names."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ComponentError(f"{path!r} is not an import path (expected 'package.module:Name').")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ComponentError(f"cannot import module {module_name!r} for {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ComponentError(
            f"module {module_name!r} has no attribute {attr!r}.{did_you_mean(attr, public)}"
        ) from None


class Registry(Generic[T]):
    """Maps names to builders (classes or functions returning a ``base`` instance).

    ``builtins`` are modules imported on first lookup so that their ``@register`` calls
    run; that keeps ``import mtl`` cheap and lets ``tasks/`` register itself.
    """

    def __init__(self, kind: str, base: type, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.base = base
        self._builtins = builtins
        self._loaded = False
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(obj, "name", None) or obj.__name__
            if key in self._entries and self._entries[key] is not obj:
                raise ComponentError(f"{self.kind} {key!r} is registered twice.")
            if inspect.isclass(obj) and not issubclass(obj, self.base):
                raise ComponentError(
                    f"{self.kind} {key!r}: {obj.__qualname__} must subclass {self.base.__name__}."
                )
            self._entries[key] = obj
            return obj

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                _import_builtin(module)
                if not any(_defined_in(entry, module) for entry in self._entries.values()):
                    raise ComponentError(
                        f"the built-in {self.kind} module {module!r} registered no {self.kind}; "
                        f"check that {ROOT / module.replace('.', '/')} is mtl's own and intact (reinstall with `make install`)."
                    )

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """A registered name, or an import path to a class or function."""
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        if ":" in name or "." in name:
            obj = import_path(name)
            if inspect.isclass(obj) and not issubclass(obj, self.base):
                raise ComponentError(f"{name!r} must subclass {self.base.__name__} to be a {self.kind}.")
            if _inside_mtl(obj) and obj not in self._entries.values():
                # mtl's own unregistered classes are bases (TaskScheduler, GramianWeighting): building one
                # gives an object whose methods raise NotImplementedError in the middle of training.
                raise ComponentError(
                    f"{name!r} is a base class of mtl, not a {self.kind} to use: name a registered {self.kind} "
                    f"(`mtl list {self.kind}s`: {', '.join(sorted(self._entries))}) or your own subclass of it."
                )
            return obj
        raise ComponentError(
            f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
            f"Available: {', '.join(sorted(self._entries))} (or an import path 'package.module:Name')."
        )

    def describe(self) -> list[tuple[str, str]]:
        """(name, the first paragraph of its docstring) for ``mtl list``."""
        from mtl.listing import describe

        return [(key, describe(self._entries[key])) for key in self.names()]


def _inside(module: Any, folder: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().is_relative_to(folder)


def _defined_in(obj: Any, module: str) -> bool:
    """``obj`` comes from ``module`` or a submodule (a package such as ``tasks``)."""
    name = getattr(obj, "__module__", "") or ""
    return name == module or name.startswith(module + ".")


PROJECT = ("mtl", "tasks")  # the top-level packages this project ships


def _inside_mtl(obj: Any) -> bool:
    return (getattr(obj, "__module__", "") or "").split(".")[0] in PROJECT


def _import_builtin(name: str) -> None:
    """Import one of mtl's own modules from ``ROOT``, whatever the working directory holds.

    `mtl` puts the working directory first on ``sys.path`` (so configs can name ``my_tasks:MyTask``),
    where a user's ``tasks.py`` or ``tasks/`` would otherwise replace the built-in task library.
    """
    top = name.partition(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None and not _inside(loaded, ROOT / top):
        where = getattr(loaded, "__file__", None) or "another location"
        raise ComponentError(
            f"the module name {top!r} is taken by {where}, which hides mtl's built-in {top} ({ROOT / top}); "
            f"rename your {Path(where).name} (e.g. my_{top}.py) and name its classes as my_{top}:Name."
        )
    sys.path.insert(0, str(ROOT))
    try:
        importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT))


def _owners(builder: Callable[..., Any]) -> list[Any]:
    """Whose ``__init__`` a class's arguments pass through, most derived first; a function is its own."""
    return [c for c in inspect.getmro(builder) if "__init__" in vars(c)] if inspect.isclass(builder) else [builder]


def _parameters(builder: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """Named parameters of ``builder``; for a class whose ``__init__`` forwards ``**kwargs``
    to its base, the base's too, made optional (the subclass may supply them itself).
    None when anything goes (a ``**kwargs`` that ends nowhere)."""
    owners = _owners(builder)
    params: list[inspect.Parameter] = []
    for depth, owner in enumerate(owners):
        try:
            sig = inspect.signature(owner.__init__ if inspect.isclass(owner) else owner)
        except (TypeError, ValueError):
            return None
        own = list(sig.parameters.values())[1 if inspect.isclass(owner) else 0 :]
        named = [p for p in own if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in {q.name for q in params}]
        params += [p.replace(default=None) if depth and p.default is p.empty else p for p in named]
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            return params
    return None


def bind_kwargs(builder: Callable[..., Any], kwargs: dict[str, Any], where: str, skip: int = 0) -> None:
    """Check that ``kwargs`` fit ``builder``'s signature; name the bad key and the valid ones.

    ``skip`` positional parameters are supplied at run time (e.g. a head's input shape).
    """
    params = _parameters(builder)
    if params is None:
        return
    runtime = [p.name for p in params[:skip]]
    accepted = [p.name for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in accepted:
            raise ComponentError(
                f"{where}.{key}: unknown argument for {getattr(builder, '__qualname__', builder)}."
                f"{did_you_mean(key, accepted)} Accepted: {', '.join(accepted) or '(none)'}."
            )
    for p in params[skip:]:
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            if p.name not in kwargs and p.name not in runtime:
                raise ComponentError(f"{where}.{p.name}: required argument is missing.")
    hints = _hints(builder)
    for key, value in kwargs.items():
        expected = _SCALARS.get(hints.get(key))
        # bool is an int to isinstance: `size: true` would build a size-1 input.
        wrong_bool = isinstance(value, bool) and bool not in (expected or ())
        if expected and value is not None and (not isinstance(value, expected) or wrong_bool):
            names = " or ".join(t.__name__ for t in expected)
            raise ComponentError(f"{where}.{key}: expected {names}, got {value!r} ({type(value).__name__}).")


def _passed_to_base(init: Callable[..., Any]) -> tuple[int, set[str]]:
    """How many positional and which keyword arguments ``init`` passes to ``super().__init__``."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return 0, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__":
            positional = sum(not isinstance(a, ast.Starred) for a in node.args)
            return positional, {k.arg for k in node.keywords if k.arg}
    return 0, set()


def _plain_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def effective_kwargs(builder: Callable[..., Any], kwargs: dict[str, Any], skip: int = 0) -> dict[str, Any]:
    """``kwargs`` plus the default of every other argument ``builder`` takes from a config: what
    the component really runs with, for the saved config, W&B and the resume check.

    Follows ``**kwargs`` to the base class as ``_parameters`` does, leaving out the arguments a
    subclass passes to its base itself (``super().__init__(num_classes=10, **kwargs)``).
    Defaults that are not plain config values (objects, tensors) are left out.
    """
    owners = _owners(builder)
    filled, supplied, positional = dict(kwargs), set(), skip
    for owner in owners:
        init = owner.__init__ if inspect.isclass(owner) else owner
        try:
            own = list(inspect.signature(init).parameters.values())[1 if inspect.isclass(owner) else 0 :]
        except (TypeError, ValueError):
            break
        for p in own[positional:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in filled or p.name in supplied:
                continue
            if p.default is not p.empty and _plain_value(p.default):
                filled[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
        positional, keywords = _passed_to_base(init)
        supplied |= keywords
    return filled


# Annotations checked against config values; anything richer is left to the component.
_SCALARS: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}
for _t in (int, float, str, bool):
    _SCALARS[_t | None] = _SCALARS[_t]


def _hints(builder: Callable[..., Any]) -> dict[str, Any]:
    owners = _owners(builder)
    hints: dict[str, Any] = {}
    for owner in reversed(owners):
        try:
            hints.update(typing.get_type_hints(owner.__init__ if inspect.isclass(owner) else owner))
        except Exception:  # unresolvable annotations (third-party code): no check
            continue
    return hints


def build(registry: Registry[T], node: dict[str, Any], where: str, *args: Any) -> T:
    """Build a component from a config node ``{name: ..., **kwargs}``."""
    node = dict(node)
    name = node.pop("name", None)
    if not name:
        raise ComponentError(
            f"{where}.name is missing: name a {registry.kind} "
            f"(one of {', '.join(registry.names())}, or an import path)."
        )
    builder = registry.get(str(name))
    bind_kwargs(builder, node, where, skip=len(args))
    try:
        obj = builder(*args, **node)
    except TypeError as e:
        # A base-class argument that the subclass passes itself (Wine's num_classes) looks
        # accepted to bind_kwargs; Python's message names neither the config key nor the fix.
        twice = re.search(r"got multiple values for (?:keyword )?argument '(\w+)'", str(e))
        if twice and twice.group(1) in node:
            raise ComponentError(f"{where}.{twice.group(1)}: {name!r} sets {twice.group(1)} itself; remove this key.") from None
        raise
    if not isinstance(obj, registry.base):
        raise ComponentError(f"{where}: {name!r} built a {type(obj).__name__}, not a {registry.base.__name__}.")
    return obj
