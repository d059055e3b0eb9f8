"""What counts as a secret, and how it is masked: one rule for every part of the project.

A name is a secret's (an environment variable such as ``AWS_SECRET_ACCESS_KEY``, a
config key such as ``store.secret_key``) when :data:`SECRET_NAME` matches it, in any
case. The stage runners mask the values of such variables in every log line they
forward (:func:`secret_values`, :func:`redact`); MLflow tracking never logs a param or
tag of such a name. A password written in a URL (``scheme://user:password@host``) is
masked wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|SESSION_KEY|(^|_)KEY($|_)",
    re.IGNORECASE,
)
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^/:@\s]+:)[^@\s/]+@", re.IGNORECASE)
MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text everywhere


def is_secret_name(name: str) -> bool:
    """True for the name of a credential: ``AWS_SECRET_ACCESS_KEY``, ``store.password``, ..."""
    return bool(SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values of the variables whose names look like credentials (AWS_SECRET_ACCESS_KEY, ...)."""
    return [
        value
        for name, value in env.items()
        if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH
    ]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask every secret value and every password inside a URL (``scheme://user:pw@``)."""
    # Longest first, so that a secret containing another one leaves no partial value.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    return URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
