"""The local service stack for development and the tests: SeaweedFS (S3), MLflow, Prefect.

Long-running helper servers started as subprocesses on free loopback ports, without
Docker (``xlearner stack up``; the integration tests' ``local_stack``). Not part of the
pipeline: the library, the stages and the flows never import it.

- :mod:`devstack.service`: :class:`Service` (start, wait until ready, stop the process
  group), :func:`find_tool`, :func:`http_status`, free ports;
- :mod:`devstack.servers`: :class:`SeaweedFS`, :class:`MlflowServer`, :class:`PrefectServer`;
- :mod:`devstack.stack`: :class:`LocalStack`, :func:`stack_up`, :func:`stack_down`.
"""

from __future__ import annotations

from devstack.servers import MlflowServer, PrefectServer, S3Settings, SeaweedFS
from devstack.service import (
    Service,
    ServiceError,
    find_tool,
    free_port,
    free_ports,
    http_status,
    stop_group,
    tail,
)
from devstack.stack import (
    STACK_ENV,
    STACK_STATE,
    LocalStack,
    read_env_file,
    running_services,
    stack_down,
    stack_up,
)

__all__ = [
    "STACK_ENV",
    "STACK_STATE",
    "LocalStack",
    "MlflowServer",
    "PrefectServer",
    "S3Settings",
    "SeaweedFS",
    "Service",
    "ServiceError",
    "find_tool",
    "free_port",
    "free_ports",
    "http_status",
    "read_env_file",
    "running_services",
    "stack_down",
    "stack_up",
    "stop_group",
    "tail",
]
