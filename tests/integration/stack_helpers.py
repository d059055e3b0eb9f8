"""Helpers of the tests that run the pipeline flow against the local stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xlearner.config import PipelineConfig


@dataclass
class StackRun:
    """One completed pipeline run on the stack: its config, Prefect flow run and result."""

    cfg: PipelineConfig
    flow_run_id: str
    result: dict[str, Any]


def run_flow(cfg: PipelineConfig) -> StackRun:
    """Run the pipeline flow in this process (Prefect: whatever server the settings name)."""
    from flows.pipeline import xlearner_pipeline

    state = xlearner_pipeline(config=cfg, return_state=True)
    assert state.is_completed(), f"pipeline flow run ended {state.name}: {state.message}"
    return StackRun(cfg, str(state.state_details.flow_run_id), state.result())
