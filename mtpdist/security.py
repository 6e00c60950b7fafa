"""Cluster secret, the mutual-TLS identity derived from it, and stable worker identity."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

from .errors import MtpdistError
from .wire.auth import TlsIdentity, is_loopback

TOKEN_HELP = ("set the cluster secret (--token, MTPDIST_TOKEN, --token-file, or ~/.config/mtpdist/token) "
              "or pass --insecure (loopback only)")


def config_dir() -> Path:
    """Per-user settings (MTPDIST_CONFIG overrides ~/.config/mtpdist)."""
    return Path(os.environ.get("MTPDIST_CONFIG") or Path.home() / ".config" / "mtpdist")


def resolve_token(token: str | None, token_file: str | None, insecure: bool) -> str | None:
    """The cluster token from the flag, the environment or a file; None only with --insecure."""
    if not token and token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as e:
            raise MtpdistError(f"cannot read token file {token_file}: {e.strerror}") from e
    token = token or os.environ.get("MTPDIST_TOKEN") or None
    default_file = config_dir() / "token"
    if token is None and not insecure and default_file.is_file():
        token = default_file.read_text().strip() or None
    if token is None and not insecure:
        raise MtpdistError(f"no cluster token: {TOKEN_HELP}")
    if token is not None and len(token) < 8:
        raise MtpdistError("the cluster token must be at least 8 characters")
    return token


def resolve_identity(token: str | None, token_file: str | None, insecure: bool, role: str = "node"):
    """This process's mutual-TLS identity from the cluster secret; None only with --insecure."""
    secret = resolve_token(token, token_file, insecure)
    return node_identity(secret, role) if secret else None


def check_insecure_hosts(hosts, allow_network: bool, what: str) -> None:
    """Refuse plaintext (--insecure) anywhere but loopback unless explicitly allowed."""
    bad = [h for h in hosts if not is_loopback(h)]
    if bad and not allow_network:
        raise MtpdistError(f"--insecure {what} {', '.join(bad)}, which is not loopback: anyone on that network could "
                           "read and change weights and activations. Use a cluster secret (--token-file), or add "
                           "--allow-insecure-network if this network is trusted")


def _fingerprint() -> str:
    return f"{socket.gethostname()}/{uuid.getnode():012x}"


def worker_id(directory: Path | None = None) -> str:
    """A stable id for this machine's worker, kept in the config folder.

    The file also records which machine wrote it; a folder copied to another Mac would
    carry a duplicate id, so a mismatch makes a fresh one.
    """
    path = (directory or config_dir()) / "worker.json"
    try:
        data = json.loads(path.read_text())
        if data.get("machine") == _fingerprint() and data.get("id"):
            return data["id"]
    except (OSError, json.JSONDecodeError):
        pass
    wid = uuid.uuid4().hex[:12]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"id": wid, "machine": _fingerprint()}))
    except OSError:
        pass  # a read-only home still gets a working (if unstable) id
    return wid


# -- Cluster identity: mutual TLS from the shared secret -------------------------------
# Every Mac holds the same cluster secret. From it each process derives the same cluster CA
# key (scrypt -> P-256 scalar), then mints a fresh key of its own and a certificate signed by
# that CA. Peers accept only certificates chained to the CA, so holding the secret is what
# lets a process take part, and the secret itself is never sent anywhere.
PEER_NAME = "mtpdist-peer"          # the SAN every node certificate carries (IPs do not matter)
_CA_NAME = "mtpdist cluster CA"
_CA_SALT = b"mtpdist cluster CA v1"


def _ca_key(secret: str):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    # scrypt, not a fast KDF: a recorded handshake lets anyone test guesses of the secret
    # offline (does this CA key verify that certificate?), so each guess should cost ~0.1 s.
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # the P-256 group order
    okm = Scrypt(salt=_CA_SALT, length=48, n=2**15, r=8, p=1).derive(secret.encode())
    return ec.derive_private_key(int.from_bytes(okm, "big") % (n - 1) + 1, ec.SECP256R1())


def _fingerprint_of(ca_key) -> str:
    """A short, non-secret name of the cluster CA (the same on every Mac holding the same secret)."""
    from cryptography.hazmat.primitives import serialization
    pub = ca_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pub).hexdigest()[:16]


def node_identity(secret: str, role: str = "node") -> TlsIdentity:
    """The cluster CA certificate plus a fresh key and certificate for this process."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = _ca_key(secret)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    # Fixed fields: every Mac builds an equivalent CA certificate (same name and key).
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
               .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(ski, critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role} {socket.gethostname()}"[:64])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))    # Macs' clocks may disagree a little
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(PEER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return TlsIdentity(
        ca_pem=ca_cert.public_bytes(pem), cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        server_name=PEER_NAME, fingerprint=_fingerprint_of(ca_key))


def add_security_arguments(p) -> None:
    """Cluster-secret flags shared by the worker and the coordinator."""
    p.add_argument("--token", default=None,
                   help="cluster secret (or MTPDIST_TOKEN, --token-file, ~/.config/mtpdist/token); peers prove they "
                        "hold it with mutual TLS, it is never sent")
    p.add_argument("--token-file", default=None, help="file holding the cluster secret")
    p.add_argument("--insecure", action="store_true", help="no secret, no TLS: loopback only")
    p.add_argument("--allow-insecure-network", action="store_true",
                   help="let --insecure use a non-loopback address (only on a network you fully trust)")
