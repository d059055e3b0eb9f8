"""The stack's API credentials: Prefect's auth string and MLflow's basic-auth user.

Both servers refuse unauthenticated requests (health probes excepted). Every value comes
from, in this order: the variable itself (``PREFECT_API_AUTH_STRING``,
``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``), a file named by its
``*_FILE`` variable (Docker/compose secrets: ``/run/secrets/...``), the ``stack.env`` of a
previous ``xlearner stack up`` in the same folder (so its MLflow users stay valid), and
else a new random value. Values are never printed: ``repr`` masks them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.service import ServiceError

PREFECT_AUTH = "PREFECT_API_AUTH_STRING"
MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
DEFAULT_MLFLOW_USER = "xlearner"


class CredentialError(ServiceError):
    """A credential variable or file is unusable; the message names it and the fix."""


def _from_file(name: str, path: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as err:
        raise CredentialError(
            f"{name}_FILE={path}: cannot read it ({err.strerror}); point {name}_FILE at a "
            f"readable file holding the value, or set {name} itself"
        ) from None
    if not value:
        raise CredentialError(f"{name}_FILE={path} is empty; write the value into it")
    return value


def lookup(name: str, environ: Mapping[str, str], previous: Mapping[str, str]) -> str | None:
    """``name`` from the environment, its ``*_FILE``, or the previous ``stack.env``."""
    if environ.get(name):
        return environ[name]
    if environ.get(f"{name}_FILE"):
        return _from_file(name, environ[f"{name}_FILE"])
    return previous.get(name) or None


@dataclass(frozen=True)
class ApiCredentials:
    """What the Prefect and MLflow servers require and their clients send."""

    prefect_auth_string: str = field(repr=False)
    mlflow_username: str
    mlflow_password: str = field(repr=False)

    @classmethod
    def resolve(
        cls, environ: Mapping[str, str] | None = None, previous: Mapping[str, str] | None = None
    ) -> ApiCredentials:
        """From the environment (or ``*_FILE``), else ``previous``, else generated."""
        environ = os.environ if environ is None else environ
        previous = previous or {}
        username = lookup(MLFLOW_USERNAME, environ, previous) or DEFAULT_MLFLOW_USER
        if ":" in username:
            raise CredentialError(
                f"{MLFLOW_USERNAME}={username!r} contains ':'; basic auth cannot carry it"
            )
        return cls(
            prefect_auth_string=lookup(PREFECT_AUTH, environ, previous)
            or f"xlearner:{secrets.token_urlsafe(30)}",
            mlflow_username=username,
            mlflow_password=lookup(MLFLOW_PASSWORD, environ, previous) or secrets.token_urlsafe(30),
        )

    def client_env(self) -> dict[str, str]:
        """The variables Prefect and MLflow clients read (the worker, flows, stages)."""
        return {
            PREFECT_AUTH: self.prefect_auth_string,
            MLFLOW_USERNAME: self.mlflow_username,
            MLFLOW_PASSWORD: self.mlflow_password,
        }
