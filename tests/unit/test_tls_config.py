"""``[nbd.tls]`` and the TLS flags: which keys go together, and the files they name.

The messages are what an operator reads on a bad start, so they are checked
word for word where it matters; key material never appears in one.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from portalbd.config import ConfigError, TlsConfig, parse
from portalbd.nbd.handshake import TlsMode
from portalbd.nbd.tls import server_context, tls_mode
from tests.support.tls import Certificates


def tls_error(toml: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse("[nbd.tls]\n" + toml, "c.toml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            'key = "/k.pem"',
            "c.toml: nbd.tls.key: set without nbd.tls.certificate (the key's certificate)",
        ),
        (
            'certificate = "/c.pem"',
            "c.toml: nbd.tls.certificate: set without nbd.tls.key (its private key)",
        ),
        ('ca = "/ca.pem"', "c.toml: nbd.tls.ca: checking client certificates needs the server's"),
        (
            'mode = "sometimes"',
            "c.toml: nbd.tls.mode: must be one of require, allow, off, got 'sometimes'",
        ),
        (
            'mode = "allow"',
            "c.toml: nbd.tls.mode = 'allow' needs nbd.tls.certificate and nbd.tls.key "
            "(--tls-certificate, --tls-key)",
        ),
        ("mode = true", "c.toml: nbd.tls.mode: expected a string, got a boolean"),
        ('cert = "/c.pem"', "c.toml: nbd.tls.cert: unknown key (known here: ca, certificate,"),
    ],
)
def test_keys_that_do_not_go_together_are_refused(toml: str, expected: str) -> None:
    assert tls_error(toml).startswith(expected)


def test_mode_defaults_to_require_with_a_certificate_and_off_without() -> None:
    assert tls_mode(parse("").nbd.tls) is TlsMode.OFF
    with_cert = parse('[nbd.tls]\ncertificate = "/c.pem"\nkey = "/k.pem"\n').nbd.tls
    assert tls_mode(with_cert) is TlsMode.REQUIRE
    assert server_context(TlsConfig()) is None


def test_a_server_context_from_good_files(certs: Certificates) -> None:
    tls = TlsConfig(certificate=str(certs.server_cert), key=str(certs.server_key))
    context = server_context(tls)
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls.ca = str(certs.ca)
    context = server_context(tls)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED


def context_error(tls: TlsConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        server_context(tls)
    return str(caught.value)


def test_unreadable_and_unusable_files_are_named(certs: Certificates, tmp_path: Path) -> None:
    cert, key = str(certs.server_cert), str(certs.server_key)
    missing = str(tmp_path / "missing.pem")
    assert context_error(TlsConfig(certificate=missing, key=key)) == (
        f"nbd.tls.certificate: cannot read {missing}: No such file or directory"
    )
    assert context_error(TlsConfig(certificate=cert, key=str(tmp_path))) == (
        f"nbd.tls.key: cannot read {tmp_path}: Is a directory"
    )
    other_key = str(certs.client_dir / "client-key.pem")
    message = context_error(TlsConfig(certificate=cert, key=other_key))
    assert message.startswith(f"nbd.tls: cannot use certificate {cert} with key {other_key}: ")
    assert "(not PEM, or the key is not the certificate's)" in message
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    message = context_error(TlsConfig(certificate=cert, key=key, ca=str(not_pem)))
    assert message.startswith(f"nbd.tls.ca: {not_pem} holds no usable PEM certificate")
    key_text = certs.server_key.read_text()
    for line in key_text.splitlines()[1:-1]:
        assert line not in message


def test_a_key_readable_by_others_is_warned_about(
    certs: Certificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loose = tmp_path / "loose-key.pem"
    loose.write_bytes(certs.server_key.read_bytes())
    loose.chmod(0o644)
    tls = TlsConfig(certificate=str(certs.server_cert), key=str(loose))
    with caplog.at_level(logging.WARNING, logger="portalbd"):
        server_context(tls)
    assert caplog.messages == [
        f"nbd.tls.key {loose} is readable by other users (mode 644): chmod o-r it (0600 or 0640)"
    ]
    caplog.clear()
    loose.chmod(0o640)
    server_context(tls)
    assert caplog.messages == []
