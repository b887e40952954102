"""A throw-away certificate authority for TLS tests, made with the openssl command line.

Two CAs: ``ca`` signs the servers' certificate (for 127.0.0.1 and localhost) and the client's; ``other_ca``
signs nothing the servers use, so a client that trusts only it must refuse them. The client certificate's
common name is ``postgres``: with ``clientcert=verify-full`` Postgres takes it as the login role.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"  # the certificates outlive any test run and nothing else
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # fast to make


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _authority(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *CURVE, "-keyout", str(key), "-out", str(cert), "-days", DAYS,
        "-subj", f"/CN=detfleet test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _signed(folder: Path, name: str, common_name: str, ca: tuple[Path, Path], extensions: str) -> None:
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", *CURVE, "-keyout", str(folder / f"{name}.key"), "-out", str(csr), "-subj", f"/CN={common_name}"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", str(folder / f"{name}.crt"), "-days", DAYS, "-extfile", str(ext),
    )  # fmt: skip


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server and a client certificate signed by it, and an unrelated CA, all in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _authority(folder, "ca")
    other_ca, _ = _authority(folder, "other-ca")
    _signed(folder, "server", "localhost", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n")  # fmt: skip
    _signed(folder, "client", "postgres", ca, "extendedKeyUsage=clientAuth\n")
    for path in folder.iterdir():
        path.chmod(0o644 if path.suffix == ".crt" else 0o600)
    return Certificates(
        ca=ca[0],
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca=other_ca,
    )
