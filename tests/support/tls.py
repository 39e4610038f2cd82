"""x509 certificates for NBD over TLS tests, made with the ``openssl`` CLI.

Two CAs: the one the server trusts (it signs the server's certificate and a
client's) and another one (it signs a stranger's client certificate). Client
directories follow libnbd's ``tls-certificates=DIR`` layout: ``ca-cert.pem``
(whom the client trusts), ``client-cert.pem`` and ``client-key.pem``.
EC P-256 keys: quick to make, and GnuTLS and OpenSSL both take them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(path: Path) -> None:
    _openssl(
        "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=path.parent
    )
    path.chmod(0o600)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = directory / f"{name}-key.pem"
    cert = directory / f"{name}-cert.pem"
    _key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN={name}", cwd=directory,
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key = directory / f"{name}-key.pem"
    cert = directory / f"{name}-cert.pem"
    request = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    _key(key)
    ext.write_text(extensions)
    _openssl(
        "req", "-new", "-key", str(key), "-out", str(request), "-subj", f"/CN={name}", cwd=directory
    )
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=directory,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA the server trusts (--tls-ca) and that signed its certificate
    server_cert: Path
    server_key: Path
    client_dir: Path  # trusts the CA; a client certificate the CA signed
    anonymous_dir: Path  # trusts the CA; no client certificate
    stranger_dir: Path  # trusts the CA; a client certificate another CA signed
    wrong_ca_dir: Path  # trusts only the other CA, so not the server


def make_certificates(root: Path) -> Certificates:
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "ca")
    other = _ca(root, "other-ca")
    server = _signed(
        root,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = _signed(root, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _signed(root, "stranger", other, "extendedKeyUsage=clientAuth\n")

    def client_dir(name: str, trusts: Path, pair: tuple[Path, Path] | None) -> Path:
        directory = root / name
        directory.mkdir()
        shutil.copy(trusts, directory / "ca-cert.pem")
        if pair is not None:
            shutil.copy(pair[0], directory / "client-cert.pem")
            shutil.copy(pair[1], directory / "client-key.pem")
        return directory

    return Certificates(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_dir=client_dir("client", ca[0], client),
        anonymous_dir=client_dir("anonymous", ca[0], None),
        stranger_dir=client_dir("stranger", ca[0], stranger),
        wrong_ca_dir=client_dir("wrong-ca", other[0], client),
    )
