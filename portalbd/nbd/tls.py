"""The server's TLS context for NBD_OPT_STARTTLS, from ``[nbd.tls]``.

Python's ``ssl`` module does all of TLS; this module only turns the
configuration into an :class:`ssl.SSLContext` and says, as a
:class:`~portalbd.config.ConfigError` naming the key and the file, why a
certificate, key or CA cannot be used. It runs once at start, before the
event loop, so its file reads block nothing. Key material is read by the
``ssl`` module alone and never appears in a message.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from portalbd.config import ConfigError, TlsConfig
from portalbd.nbd.handshake import TlsMode
from portalbd.private import check_secret_file


def tls_mode(tls: TlsConfig) -> TlsMode:
    return TlsMode(tls.effective_mode())


def _readable(path_text: str, key: str) -> Path:
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"nbd.tls.{key}: cannot read {path}: {exc.strerror}") from None
    return path


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The context NBD connections are upgraded with, or None with TLS off.

    TLS 1.2 at least (the NBD spec's floor). With ``ca`` the client must
    present a certificate that CA signed; without it, any client may
    connect over TLS and only the server proves who it is.
    """
    if tls_mode(tls) is TlsMode.OFF:
        return None
    assert tls.certificate and tls.key  # validate_tls made sure
    certificate = _readable(tls.certificate, "certificate")
    key = _readable(tls.key, "key")
    check_secret_file(key, "nbd.tls.key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"nbd.tls: cannot use certificate {certificate} with key {key}: "
            f"{exc.reason or exc} (not PEM, or the key is not the certificate's)"
        ) from None
    if tls.ca:
        ca = _readable(tls.ca, "ca")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"nbd.tls.ca: {ca} holds no usable PEM certificate: {exc.reason or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
