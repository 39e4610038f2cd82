"""S3 settings resolution: precedence, defaults, environment files, no secrets shown."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from portalbd.config import S3Config
from portalbd.store.location import parse_storage_url
from portalbd.store.s3 import S3SetupError, read_environment_file, resolve_settings

LOCATION = parse_storage_url("s3://my-bucket/some/prefix")


def test_aws_defaults_without_endpoint() -> None:
    s = resolve_settings(LOCATION, S3Config(), {})
    assert (s.bucket, s.prefix, s.endpoint, s.region) == (
        "my-bucket",
        "some/prefix",
        None,
        "us-east-1",
    )
    assert not s.allow_http and not s.path_style
    assert s.credentials_source.startswith("default AWS credential chain")
    assert s.object_store_config()["aws_virtual_hosted_style_request"] == "true"


def test_environment_then_config_precedence() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000/",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
    }
    s = resolve_settings(LOCATION, S3Config(), env)
    assert s.endpoint == "http://minio:9000" and s.region == "eu-west-1"
    assert s.allow_http and s.path_style  # plain-HTTP, self-hosted endpoint
    s = resolve_settings(
        LOCATION, S3Config(endpoint="https://s3.example", region="auto", path_style=False), env
    )
    assert (s.endpoint, s.region, s.allow_http, s.path_style) == (
        "https://s3.example",
        "auto",
        False,
        False,
    )
    conf = s.object_store_config()
    assert conf["aws_access_key_id"] == "AKIDEXAMPLE" and conf["timeout"] == "10000ms"
    shown = repr(s) + str(s.describe())
    assert "very-secret" not in shown and "AKIDEXAMPLE" not in shown


def test_environment_file_beats_process_environment(tmp_path: Path) -> None:
    path = tmp_path / "s3.env"
    path.write_text(
        "# comment\n\nexport AWS_ACCESS_KEY_ID='from-file'\nAWS_SECRET_ACCESS_KEY=\"s e\"\n"
    )
    assert read_environment_file(path) == {
        "AWS_ACCESS_KEY_ID": "from-file",
        "AWS_SECRET_ACCESS_KEY": "s e",
    }
    env = {"AWS_ACCESS_KEY_ID": "from-env", "AWS_SECRET_ACCESS_KEY": "x"}
    s = resolve_settings(LOCATION, S3Config(environment_file=str(path)), env)
    assert s.access_key_id == "from-file"
    assert s.describe()["credentials"] == f"environment file {path}"


def test_environment_file_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s3.env"
    path.write_text("AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=never-in-a-log\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="portalbd"):
        resolve_settings(LOCATION, S3Config(environment_file=str(path)), {})
    assert caplog.messages == [
        f"storage.s3.environment_file {path} is readable by other users (mode 644): "
        "chmod o-r it (0600 or 0640)"
    ]
    assert "never-in-a-log" not in caplog.text


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        (
            S3Config(environment_file="/nonexistent/s3.env"),
            {},
            "cannot read storage.s3.environment_file",
        ),
        (S3Config(endpoint="minio:9000"), {}, "must start with http:// or https://"),
        (S3Config(endpoint="http://m:9000", allow_http=False), {}, "allow_http is false"),
        (S3Config(), {"AWS_ACCESS_KEY_ID": "k"}, "AWS_SECRET_ACCESS_KEY is not set"),
        (S3Config(request_timeout_ms=0), {}, "request_timeout_ms must be positive"),
    ],
)
def test_bad_settings_are_explained(config: S3Config, env: dict[str, str], message: str) -> None:
    with pytest.raises(S3SetupError, match=message):
        resolve_settings(LOCATION, config, env)


def test_bad_environment_file_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.env"
    path.write_text("AWS_REGION=x\nnot a pair\n")
    with pytest.raises(S3SetupError, match=r"bad.env:2: expected KEY=value"):
        read_environment_file(path)
