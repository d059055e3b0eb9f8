"""The head interface and the head registry (docs/architecture.md, "Heads").

Every task head subclasses :class:`TaskHead` and registers itself under its task with
:func:`register_head`: the supervised heads in :mod:`xlearner.models.heads`, the
self-supervised ones in :mod:`xlearner.models.ssl`. ``create_head`` (in ``heads``)
builds them by task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from xlearner.metrics import MetricAccumulator


class TaskHead(nn.Module, ABC):
    """The interface every head implements (docs/architecture.md, "Heads")."""

    task: str = ""

    def __init__(self, channels: Sequence[int], num_classes: int, image_size: int) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.num_classes = num_classes
        self.image_size = image_size

    def prepare_inputs(self, images: Tensor) -> tuple[Tensor, Any]:
        """What the trunk sees, and a context for ``forward``; identity for supervised heads."""
        return images, None

    @abstractmethod
    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Any, ctx: Any
    ) -> dict[str, Tensor]:
        """Named losses; their sum is the training loss."""

    @abstractmethod
    def predict(self, features: Sequence[Tensor]) -> Any: ...

    @abstractmethod
    def metric(self) -> MetricAccumulator: ...


_HEADS: dict[str, type[TaskHead]] = {}


def register_head(task: str) -> Callable[[type[TaskHead]], type[TaskHead]]:
    """Class decorator: ``create_head(task, ...)`` builds this class."""

    def decorator(cls: type[TaskHead]) -> type[TaskHead]:
        if task in _HEADS:
            raise ValueError(f"a head for task {task!r} is already registered: {_HEADS[task]}")
        cls.task = task
        _HEADS[task] = cls
        return cls

    return decorator


def available_heads() -> list[str]:
    return sorted(_HEADS)


def head_class(task: str) -> type[TaskHead]:
    """The head registered for ``task``."""
    if task not in _HEADS:
        raise ValueError(f"no head for task {task!r}; available: {available_heads()}")
    return _HEADS[task]
