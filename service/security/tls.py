"""Server TLS from PEM files, reloaded when the files change (Kubernetes secret rotation).

grpc's dynamic server credentials ask `CertificateFiles` for a configuration before each new
connection's handshake (on a gRPC core thread, never the event loop); it answers None ("keep the
current one") unless the files changed, and then loads and checks them. Connections already open keep
their session, so streams in flight are not dropped; `--max-connection-age` makes long-lived
connections pick up the new certificate. A bad new file (key not matching, expired, unreadable) is
logged and the previous certificate stays in use.

Client certificates: grpcio's Python binding offers two modes, none and require (the C core's
"request but do not require" mode is not reachable from Python), so `--tls-client-auth` has those two.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("visionchat.tls")
CLIENT_AUTH_MODES = ("none", "require")
RECHECK_SECONDS = 2.0  # files are stat'ed at most this often (once per new connection otherwise)


class TLSConfigError(ValueError):
    """The certificate, key or CA files cannot serve TLS; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    not_after: datetime.datetime


def check_pair(cert_pem: bytes, key_pem: bytes, where: str) -> datetime.datetime:
    """The certificate's expiry, after checking that it is current and that the key is its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TLSConfigError(f"{where}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"{where}: the key file is not an unencrypted PEM private key ({exc})") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise TLSConfigError(f"{where}: the private key does not belong to the certificate")
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise TLSConfigError(f"{where}: the certificate expired at {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise TLSConfigError(f"{where}: the certificate is valid only from {cert.not_valid_before_utc.isoformat()}")
    return cert.not_valid_after_utc


class CertificateFiles:
    """The server's certificate chain, key and (for client certificates) CA bundle, as files."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "", client_auth: str = "none") -> None:
        if client_auth not in CLIENT_AUTH_MODES:
            raise TLSConfigError(
                f"--tls-client-auth must be one of {', '.join(CLIENT_AUTH_MODES)}, got {client_auth!r}"
            )
        if client_auth == "require" and not client_ca_file:
            raise TLSConfigError(
                "--tls-client-auth require needs --tls-client-ca-file (the CA that signs client certificates)"
            )
        self.paths = [Path(p) for p in (cert_file, key_file, client_ca_file) if p]
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.require_client_cert = client_auth == "require"
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._signature = self._stat()
        self.loaded = self._load()
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int], ...]:
        # os.stat follows the ..data symlink Kubernetes swaps on a secret update.
        try:
            return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in self.paths)
        except OSError as exc:
            raise TLSConfigError(f"cannot read a TLS file: {exc}") from exc

    def _load(self) -> LoadedFiles:
        try:
            cert, key = Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()
            ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        except OSError as exc:
            raise TLSConfigError(f"cannot read a TLS file: {exc}") from exc
        not_after = check_pair(cert, key, f"{self.cert_file} / {self.key_file}")
        return LoadedFiles(cert, key, ca, not_after)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        f = self.loaded
        return grpc.ssl_server_certificate_configuration([(f.key, f.cert)], root_certificates=f.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self, require_client_authentication=self.require_client_cert
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher: a new configuration when the files changed, else None (keep the current one)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < RECHECK_SECONDS:
                return None
            self._checked_at = now
            try:
                signature = self._stat()
                if signature == self._signature:
                    return None
                loaded = self._load()
            except TLSConfigError as exc:
                log.error("TLS files changed but cannot be used (keeping the previous certificate): %s", exc)
                return None
            self._signature, self.loaded = signature, loaded
            self.reloads += 1
            log.info("TLS certificate reloaded (valid until %s)", loaded.not_after.isoformat())
            return self.configuration()
