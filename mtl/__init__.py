"""mtl: transfer learning and multi-task learning research in PyTorch."""

import importlib

# The public API, imported on first use (PEP 562): `import mtl` and `mtl list` stay cheap,
# and `from mtl import Task` works as usual.
_EXPORTS = {
    "LookaheadAffinity": "mtl.affinity",
    "select_groups": "mtl.affinity",
    "ConfigError": "mtl.config",
    "load_config": "mtl.config",
    "split_indices": "mtl.data",
    "tensor_splits": "mtl.data",
    "average_accuracy": "mtl.forgetting",
    "backward_transfer": "mtl.forgetting",
    "forward_transfer": "mtl.forgetting",
    "HEADS": "mtl.heads",
    "Head": "mtl.heads",
    "register_head": "mtl.heads",
    "MultiTaskModel": "mtl.model",
    "ComponentError": "mtl.registry",
    "SCHEDULERS": "mtl.scheduler",
    "Sources": "mtl.scheduler",
    "backward": "mtl.step",
    "TaskScheduler": "mtl.scheduler",
    "register_scheduler": "mtl.scheduler",
    "MISSING_LABEL": "mtl.task",
    "TASKS": "mtl.task",
    "ClassificationTask": "mtl.task",
    "MultiLabelTask": "mtl.task",
    "RegressionTask": "mtl.task",
    "Splits": "mtl.task",
    "Task": "mtl.task",
    "register_task": "mtl.task",
    "TRUNKS": "mtl.trunks",
    "Trunk": "mtl.trunks",
    "register_trunk": "mtl.trunks",
    "WEIGHTINGS": "mtl.weighting",
    "Weighting": "mtl.weighting",
    "register_weighting": "mtl.weighting",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "HEADS",
    "MISSING_LABEL",
    "SCHEDULERS",
    "TASKS",
    "TRUNKS",
    "WEIGHTINGS",
    "ClassificationTask",
    "ComponentError",
    "ConfigError",
    "Head",
    "LookaheadAffinity",
    "MultiLabelTask",
    "MultiTaskModel",
    "RegressionTask",
    "Sources",
    "Splits",
    "Task",
    "TaskScheduler",
    "Trunk",
    "Weighting",
    "average_accuracy",
    "backward",
    "backward_transfer",
    "forward_transfer",
    "load_config",
    "register_head",
    "register_scheduler",
    "register_task",
    "register_trunk",
    "register_weighting",
    "select_groups",
    "split_indices",
    "tensor_splits",
]
