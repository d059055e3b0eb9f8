"""A flow whose parameters Prefect records with their secrets masked (:mod:`xlearner.secrets`).

Prefect stores a flow run's parameters as the flow serialises them and shows them in its
UI and API. A run started in this process (``xlearner run``) keeps the real values it
was called with; the record gets :func:`~xlearner.secrets.redact_value` of them: URL
passwords, secret query values and credential-named fields masked. A deployment's
parameters are its record already, so deployments refuse configs with URL credentials
(:func:`flows.deployments.check_no_url_credentials`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from xlearner.secrets import redact_value


class RedactedParametersFlow(Flow):
    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return redact_value(super().serialize_parameters(parameters))


def redacted_flow(**options: Any) -> Callable[[Callable], RedactedParametersFlow]:
    """``@flow(**options)`` whose recorded parameters have their secrets masked."""
    return lambda fn: RedactedParametersFlow(fn=fn, **options)
