"""What counts as a secret, and how it is masked: one rule for every part of the project.

A name is a secret's (an environment variable such as ``AWS_SECRET_ACCESS_KEY``, a
config key such as ``store.secret_key``) when :data:`SECRET_NAME` matches it, in any
case. A value is a secret when it is the value of such a name, the password of a URL
(``scheme://user:password@host``) or a credential in a URL's query string
(``?X-Amz-Signature=...``, ``&password=...``). :func:`redact` masks them all, wherever
they appear: the stage runners in every log line they forward (:func:`secret_values`
of the stage's environment), MLflow tracking in every param and tag
(:func:`redact_value`), the pipeline flow in the parameters Prefect records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|SESSION_KEY|AUTH_STRING"
    r"|(^|[_.])KEY($|[_.])",
    re.IGNORECASE,
)
# Query parameters that carry a credential although their name is no secret's elsewhere.
SECRET_QUERY_NAME = re.compile(r"SIGNATURE|^SIG$|AUTH", re.IGNORECASE)
URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^/:@\s?#]+:)(?P<secret>[^@\s/?#]+)@", re.IGNORECASE
)
QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<secret>[^&;#\s\"']+)")
MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text everywhere


def is_secret_name(name: str) -> bool:
    """True for the name of a credential: ``AWS_SECRET_ACCESS_KEY``, ``store.password``, ..."""
    return bool(SECRET_NAME.search(name))


def _is_secret_query(name: str) -> bool:
    return is_secret_name(name) or bool(SECRET_QUERY_NAME.search(name))


def url_secrets(text: str) -> list[str]:
    """The credentials written inside URLs in ``text``: passwords and secret query values."""
    found = [m["secret"] for m in URL_PASSWORD.finditer(text)]
    found += [m["secret"] for m in QUERY_PARAM.finditer(text) if _is_secret_query(m["name"])]
    return found


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The secrets of an environment: values of credential-named variables (AWS_SECRET_ACCESS_KEY,
    ...) and credentials inside any variable's URL (``AWS_ENDPOINT_URL=http://id:pw@host``)."""
    values = [value for name, value in env.items() if is_secret_name(name)]
    for value in env.values():
        values += url_secrets(value)
    return [value for value in values if len(value) >= MIN_SECRET_LENGTH]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask every secret value, every password inside a URL and every secret query value."""
    # Longest first, so that a secret containing another one leaves no partial value.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    text = URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return QUERY_PARAM.sub(
        lambda m: f"{m['head']}{MASK}" if _is_secret_query(m["name"]) else m[0], text
    )


def redact_value(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with :func:`redact` applied to every string
    and every value of a credential-named key masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            k: MASK if is_secret_name(str(k)) and v else redact_value(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def fields_with_url_credentials(value: Any, path: str = "") -> list[str]:
    """Dotted paths (``tracking.uri``) of the strings in ``value`` that hold a credential
    inside a URL."""
    if isinstance(value, str):
        return [path or "<value>"] if url_secrets(value) else []
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    return [f for k, v in items for f in fields_with_url_credentials(v, f"{path}.{k}".lstrip("."))]


def loggable(items: Mapping[str, Any]) -> dict[str, str]:
    """``items`` as they may be logged (MLflow tags): credential-named keys dropped, values
    redacted."""
    return {k: redact(str(v)) for k, v in items.items() if not is_secret_name(k)}
