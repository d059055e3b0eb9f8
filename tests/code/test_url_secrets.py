"""Secrets masked by value: credentials inside URLs, wherever they would be shown."""

from __future__ import annotations

import sys

import pytest

from flows.runners import ProcessRunner
from xlearner.secrets import (
    fields_with_url_credentials,
    loggable,
    redact,
    redact_value,
    secret_values,
)
from xlearner.tracking import flatten

PASSWORD = "Zq8-url-password"


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://id:{PASSWORD}@host:8333/x", "http://id:***@host:8333/x"),
        (f"s3://AKID:{PASSWORD}@bucket/key", "s3://AKID:***@bucket/key"),
        (
            f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature={PASSWORD}",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        (
            f"postgresql://db/x?user=xl&password={PASSWORD}",
            "postgresql://db/x?user=xl&password=***",
        ),
        (
            "http://mlflow:5000/#/runs?page=2&sort=name",
            "http://mlflow:5000/#/runs?page=2&sort=name",
        ),
    ],
)
def test_url_credentials_are_masked(text, shown):
    assert redact(text) == shown


def test_a_url_password_in_any_variable_is_a_secret_value():
    env = {"AWS_ENDPOINT_URL_S3": f"http://id:{PASSWORD}@host", "HOME": "/home/x"}
    assert secret_values(env) == [PASSWORD]


def test_the_stage_log_masks_a_url_password_even_printed_alone():
    lines: list[str] = []
    ProcessRunner(warm_start=False).run_command(
        [sys.executable, "-c", "import os; print('pw', os.environ['XL_URL'].split(':')[2][:16])"],
        stage="leaky-url",
        env={"XL_URL": f"http://id:{PASSWORD}@host"},
        log=lines.append,
    )
    assert lines == ["pw ***"]


def test_mlflow_params_and_tags_carry_no_url_password():
    config = {"tracking": {"uri": f"http://xl:{PASSWORD}@mlflow:5000"}, "store": {"key": "k"}}
    assert flatten(config) == {"tracking.uri": "http://xl:***@mlflow:5000"}
    assert loggable({"source": f"s3://a:{PASSWORD}@b/x", "api_token": "t"}) == {
        "source": "s3://a:***@b/x"
    }


def test_recorded_parameters_are_masked_and_the_fields_named():
    config = {"store": {"endpoint_url": f"http://id:{PASSWORD}@h"}, "sources": [{"uri": "/d"}]}
    assert redact_value(config) == {"store": {"endpoint_url": "http://id:***@h"}, "sources": [
        {"uri": "/d"}
    ]}  # fmt: skip
    assert fields_with_url_credentials(config) == ["store.endpoint_url"]


def test_prefect_records_the_flow_parameters_masked():
    from flows.redaction import redacted_flow

    @redacted_flow(name="redaction-probe")
    def probe(config: dict) -> None: ...

    given = {"tracking": {"uri": f"http://xl:{PASSWORD}@mlflow:5000"}}
    assert probe.serialize_parameters({"config": given}) == {
        "config": {"tracking": {"uri": "http://xl:***@mlflow:5000"}}
    }
    assert given["tracking"]["uri"].endswith(f"{PASSWORD}@mlflow:5000")  # the run keeps it


def test_a_deployment_refuses_a_config_with_url_credentials(tmp_path):
    from flows.deployments import check_no_url_credentials
    from tests.pipeline_config import tiny_config
    from xlearner.config import ConfigError

    cfg = tiny_config("/data", "s3://b/x", f"http://xl:{PASSWORD}@mlflow:5000")
    with pytest.raises(ConfigError, match=r"tracking.uri holds a credential inside a URL") as info:
        check_no_url_credentials(cfg)
    assert PASSWORD not in str(info.value)
    check_no_url_credentials(tiny_config("/data", "s3://b/x", "http://mlflow:5000"))
