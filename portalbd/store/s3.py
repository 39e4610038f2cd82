"""S3-compatible buckets: connection settings, the SlateDB object store, start-up checks.

Settings come from three places, strongest first: the ``[storage.s3]``
table, the environment file it names, and the process environment (the
standard ``AWS_*`` variables). Secrets stay inside :class:`S3Settings`:
its ``repr`` and :meth:`S3Settings.describe` never show them, so neither
logs nor ``status`` can leak them.

SlateDB's S3 client retries for minutes by default. We give it an explicit
budget (a per-request timeout and a retry count), and before SlateDB ever
touches the bucket we check it with boto3 under the same budget, so a
wrong endpoint, wrong credentials or a missing bucket is reported within
seconds, naming the bucket and endpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portalbd.config import S3Config
from portalbd.private import check_secret_file
from portalbd.store.location import StorageLocation

DEFAULT_REGION = "us-east-1"
# The longest we wait to establish a TCP connection, whatever the request
# timeout: an endpoint that does not answer a SYN within this is down.
MAX_CONNECT_TIMEOUT_MS = 3000


class S3SetupError(Exception):
    """The bucket cannot be used; the message names bucket, endpoint and cause."""


@dataclass(frozen=True, slots=True)
class S3Settings:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    allow_http: bool
    path_style: bool
    request_timeout_ms: int
    max_retries: int
    create_bucket: bool
    credentials_source: str
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @property
    def endpoint_display(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    @property
    def connect_timeout_ms(self) -> int:
        return min(self.request_timeout_ms, MAX_CONNECT_TIMEOUT_MS)

    def describe(self) -> dict[str, Any]:
        """What logs and ``status`` may show: everything except secrets."""
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self.endpoint_display,
            "region": self.region,
            "allow_http": self.allow_http,
            "path_style": self.path_style,
            "request_timeout_ms": self.request_timeout_ms,
            "max_retries": self.max_retries,
            "credentials": self.credentials_source,
        }

    def object_store_config(self) -> dict[str, str]:
        """``object_store`` crate config keys (AmazonS3ConfigKey / ClientConfigKey)."""
        conf = {
            "aws_region": self.region,
            "aws_allow_http": "true" if self.allow_http else "false",
            "aws_virtual_hosted_style_request": "false" if self.path_style else "true",
            "timeout": f"{self.request_timeout_ms}ms",
            "connect_timeout": f"{self.connect_timeout_ms}ms",
        }
        if self.endpoint:
            conf["aws_endpoint"] = self.endpoint
        if self.access_key_id and self.secret_access_key:
            conf["aws_access_key_id"] = self.access_key_id
            conf["aws_secret_access_key"] = self.secret_access_key
            if self.session_token:
                conf["aws_session_token"] = self.session_token
        return conf


# --- settings ----------------------------------------------------------------


def read_environment_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines (``export``, quotes and ``#`` comments allowed).

    The same format systemd's ``EnvironmentFile=`` and docker's ``--env-file``
    read, so one file can serve both. Values are never echoed in errors.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise S3SetupError(
            f"cannot read storage.s3.environment_file {path}: {exc.strerror}"
        ) from exc
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not all(c.isalnum() or c == "_" for c in key):
            raise S3SetupError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        if value[:1] in ("'", '"'):
            try:
                parts = shlex.split(value)
            except ValueError:
                raise S3SetupError(f"{path}:{number}: unbalanced quotes in {key}") from None
            value = parts[0] if parts else ""
        values[key] = value
    return values


def _truthy(value: str | None) -> bool | None:
    if value is None or value == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def resolve_settings(
    location: StorageLocation,
    config: S3Config,
    environ: Mapping[str, str] | None = None,
) -> S3Settings:
    """Merge the config table, the environment file and the environment."""
    if location.kind != "s3":
        raise ValueError(f"{location.display} is not an S3 URL")
    env: dict[str, str] = dict(os.environ if environ is None else environ)
    source = "environment"
    if config.environment_file:
        check_secret_file(Path(config.environment_file), "storage.s3.environment_file")
        env.update(read_environment_file(Path(config.environment_file)))
        source = f"environment file {config.environment_file}"

    def pick(*names: str) -> str | None:
        for name in names:
            value = env.get(name)
            if value:
                return value
        return None

    endpoint = config.endpoint or pick("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
    if endpoint:
        endpoint = endpoint.rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise S3SetupError(
                f"storage.s3.endpoint {endpoint!r} must start with http:// or https://"
            )
    region = config.region or pick("AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION
    allow_http = config.allow_http
    if allow_http is None:
        allow_http = _truthy(env.get("AWS_ALLOW_HTTP"))
    if allow_http is None:
        allow_http = bool(endpoint and endpoint.startswith("http://"))
    if endpoint and endpoint.startswith("http://") and not allow_http:
        raise S3SetupError(
            f"storage.s3.endpoint {endpoint} is plain HTTP but allow_http is false; "
            "use https:// or set allow_http = true"
        )
    path_style = config.path_style
    if path_style is None:
        hosted = _truthy(env.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST"))
        # Self-hosted servers (MinIO, Ceph, Garage) want path-style; AWS wants
        # virtual-hosted. R2 accepts both.
        path_style = (not hosted) if hosted is not None else endpoint is not None
    if config.request_timeout_ms <= 0:
        raise S3SetupError("storage.s3.request_timeout_ms must be positive")
    if config.max_retries < 0:
        raise S3SetupError("storage.s3.max_retries must not be negative")
    key_id = pick("AWS_ACCESS_KEY_ID")
    secret = pick("AWS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise S3SetupError(f"{missing} is not set but its partner is ({source})")
    if not key_id:
        source = "default AWS credential chain (no AWS_ACCESS_KEY_ID set)"
    bucket, _, _ = location.store_url.removeprefix("s3://").partition("/")
    return S3Settings(
        bucket=bucket,
        prefix=location.prefix,
        endpoint=endpoint,
        region=region,
        allow_http=allow_http,
        path_style=path_style,
        request_timeout_ms=config.request_timeout_ms,
        max_retries=config.max_retries,
        create_bucket=config.create_bucket,
        credentials_source=source,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=pick("AWS_SESSION_TOKEN"),
    )


# --- the SlateDB object store ----------------------------------------------------


def build_object_store(settings: S3Settings) -> Any:
    """A SlateDB ObjectStore for the bucket, with our timeouts and addressing.

    Seeded from the environment first (so instance-profile, web-identity and
    container credentials work when no keys are given), then every explicit
    setting is applied on top.
    """
    from portalbd.store.binding import sdb, translate_error

    try:
        builder = sdb.ObjectStoreBuilder.from_env(sdb.ObjectStoreType.S3)
        builder.with_url(f"s3://{settings.bucket}")
        for key, value in settings.object_store_config().items():
            builder.with_config(key, value)
        return builder.build()
    except sdb.Error as exc:
        raise S3SetupError(
            str(
                translate_error(
                    exc,
                    f"cannot configure S3 client for bucket {settings.bucket} "
                    f"at {settings.endpoint_display}",
                )
            )
        ) from exc


# --- start-up checks -----------------------------------------------------------


def _quiet_sdk_logs() -> None:
    """botocore's debug logs print request signing material: never let them through."""
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _boto_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    timeout = settings.request_timeout_ms / 1000
    config = BotoConfig(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout_ms / 1000,
        read_timeout=timeout,
        retries={"max_attempts": 1 + min(settings.max_retries, 1), "mode": "standard"},
        s3={"addressing_style": "path" if settings.path_style else "virtual"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        config=config,
    )


def _explain(exc: BaseException, settings: S3Settings, action: str) -> S3SetupError:
    """One sentence an operator can act on, naming bucket and endpoint."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = f"bucket {settings.bucket!r} at {settings.endpoint_display}"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return S3SetupError(
            f"cannot reach S3 endpoint {settings.endpoint_display} ({action} {where}): "
            "is the server up and the address right?"
        )
    if isinstance(exc, ReadTimeoutError):
        return S3SetupError(
            f"S3 endpoint {settings.endpoint_display} did not answer within "
            f"{settings.request_timeout_ms} ms ({action} {where})"
        )
    if isinstance(exc, NoCredentialsError):
        return S3SetupError(
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (environment or storage.s3.environment_file)"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404", "NotFound"):
            return S3SetupError(
                f"{where} does not exist: create it, or set create_bucket = true in [storage.s3]"
            )
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
            "AuthorizationHeaderMalformed",
        ) or (status == 403 and action == "checking"):
            return S3SetupError(
                f"credentials rejected by {settings.endpoint_display} for {where} "
                f"({code or status}; credentials from {settings.credentials_source})"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return S3SetupError(
                f"access denied {action} {where}: the credentials "
                f"({settings.credentials_source}) lack permission"
            )
        message = error.get("Message") or code or str(status)
        return S3SetupError(f"S3 error {action} {where}: {message}")
    return S3SetupError(f"S3 error {action} {where}: {exc}")


def preflight(settings: S3Settings, *, read_only: bool = False) -> None:
    """Check the bucket exists (or create it) and that we may write under the prefix.

    Blocking (boto3); bounded by the request timeout and a couple of
    retries, so it answers in seconds even when the endpoint is down.
    ``read_only`` (a read replica, which may hold read-only credentials)
    creates nothing and writes nothing: it checks the bucket and lists the
    prefix.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    _quiet_sdk_logs()
    client = _boto_client(settings)
    try:
        try:
            client.head_bucket(Bucket=settings.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            missing = code in ("404", "NoSuchBucket", "NotFound")
            if missing and read_only:
                raise S3SetupError(
                    f"bucket {settings.bucket!r} at {settings.endpoint_display} does not "
                    "exist; a read-only replica never creates one: start the writer on it first"
                ) from None
            if not missing or not settings.create_bucket:
                raise _explain(exc, settings, "checking") from None
            try:
                if settings.region == DEFAULT_REGION or settings.endpoint:
                    client.create_bucket(Bucket=settings.bucket)
                else:
                    client.create_bucket(
                        Bucket=settings.bucket,
                        CreateBucketConfiguration={"LocationConstraint": settings.region},
                    )
            except (ClientError, BotoCoreError) as create_exc:
                raise _explain(create_exc, settings, "creating") from None
        if read_only:
            try:
                client.list_objects_v2(
                    Bucket=settings.bucket, Prefix=settings.prefix or "", MaxKeys=1
                )
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc, settings, "listing") from None
            return
        probe = "/".join(p for p in (settings.prefix, f".portalbd-probe-{uuid.uuid4().hex}") if p)
        try:
            client.put_object(Bucket=settings.bucket, Key=probe, Body=b"portalbd write check")
            client.delete_object(Bucket=settings.bucket, Key=probe)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, settings, f"writing {probe!r} to") from None
    except BotoCoreError as exc:
        raise _explain(exc, settings, "checking") from None
    finally:
        client.close()
