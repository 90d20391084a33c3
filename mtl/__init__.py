"""mtl: transfer learning and multi-task learning research in PyTorch."""

from mtl.config import ConfigError, load_config
from mtl.data import split_indices, tensor_splits
from mtl.heads import HEADS, Head, register_head
from mtl.model import MultiTaskModel
from mtl.registry import ComponentError
from mtl.scheduler import SCHEDULERS, Sources, TaskScheduler, register_scheduler
from mtl.task import (
    MISSING_LABEL,
    TASKS,
    ClassificationTask,
    MultiLabelTask,
    RegressionTask,
    Splits,
    Task,
    register_task,
)
from mtl.trunks import TRUNKS, Trunk, register_trunk
from mtl.weighting import WEIGHTINGS, Weighting, register_weighting

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
    "MultiLabelTask",
    "MultiTaskModel",
    "RegressionTask",
    "Sources",
    "Splits",
    "Task",
    "TaskScheduler",
    "Trunk",
    "Weighting",
    "load_config",
    "register_head",
    "register_scheduler",
    "register_task",
    "register_trunk",
    "register_weighting",
    "split_indices",
    "tensor_splits",
]
