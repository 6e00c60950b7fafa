"""Cluster tokens and stable worker identity."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

from .errors import MtpdistError

TOKEN_HELP = ("set a cluster token (--token, MTPDIST_TOKEN, --token-file, or ~/.config/mtpdist/token) "
              "or pass --insecure")


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
