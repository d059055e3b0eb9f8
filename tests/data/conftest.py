"""Fixtures of the data tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def copy_source(synth_data, tmp_path) -> Callable[[str], Path]:
    """A writable copy of a synthetic source."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(synth_data.paths[name], target)
        return target

    return copy
