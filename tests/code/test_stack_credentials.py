"""Where the local stack's Prefect and MLflow credentials come from (devstack.credentials)."""

from __future__ import annotations

import pytest

from devstack.credentials import ApiCredentials, CredentialError


def test_taken_from_the_variables_then_files_then_the_previous_stack_env(tmp_path):
    secret_file = tmp_path / "mlflow-password"
    secret_file.write_text("from-the-file\n")
    creds = ApiCredentials.resolve(
        {
            "PREFECT_API_AUTH_STRING": "ops:s3cret",
            "MLFLOW_TRACKING_PASSWORD_FILE": str(secret_file),
        },
        previous={"MLFLOW_TRACKING_USERNAME": "earlier", "MLFLOW_TRACKING_PASSWORD": "old"},
    )
    assert creds.client_env() == {
        "PREFECT_API_AUTH_STRING": "ops:s3cret",
        "MLFLOW_TRACKING_USERNAME": "earlier",
        "MLFLOW_TRACKING_PASSWORD": "from-the-file",
    }


def test_generated_when_absent_and_never_shown():
    first, second = ApiCredentials.resolve({}), ApiCredentials.resolve({})
    user, _, password = first.prefect_auth_string.partition(":")
    assert user == "xlearner" and len(password) >= 30 and len(first.mlflow_password) >= 30
    assert first.prefect_auth_string != second.prefect_auth_string
    assert first.mlflow_password not in repr(first)
    assert first.prefect_auth_string not in repr(first)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MLFLOW_TRACKING_PASSWORD_FILE": "/nonexistent/pw"}, "MLFLOW_TRACKING_PASSWORD_FILE="),
        ({"MLFLOW_TRACKING_USERNAME": "a:b"}, "contains ':'"),
    ],
)
def test_unusable_values_are_named(environ, message, tmp_path):
    with pytest.raises(CredentialError, match=message):
        ApiCredentials.resolve(environ)


def test_an_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        ApiCredentials.resolve({"PREFECT_API_AUTH_STRING_FILE": str(empty)})
