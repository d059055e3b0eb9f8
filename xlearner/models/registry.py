"""The backbone registry: architecture names -> zero-argument factories.

A leaf: it imports nothing from xlearner, so anything that only needs the names (the
config's validation) can ask it. The family modules (:mod:`xlearner.models.resnets`)
register their factories when they are imported, and ``xlearner.models`` imports every
family module, so importing anything from the package fills the registry (as timm does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

_REGISTRY: dict[str, Callable[[], Any]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register a zero-argument factory under ``name``."""

    def decorator(factory: Callable[[], Any]) -> Callable[[], Any]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | Path | None = None) -> Any:
    """A freshly initialised backbone, or one loaded from the local file ``weights``
    (a :class:`~xlearner.models.backbone.Backbone`: see its ``load_weights``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    backbone = _REGISTRY[name]()
    if weights is not None:
        backbone.load_weights(weights)
    return backbone
