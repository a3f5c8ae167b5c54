"""An append-only JSONL log of every safety decision, for moderation review."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def default_audit_log_path() -> Path | None:
    """SKYLOOM_AUDIT_LOG names the file ('off' disables); default: the user's state directory."""
    setting = os.environ.get("SKYLOOM_AUDIT_LOG", "").strip()
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    if setting:
        return Path(setting).expanduser()
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return state / "skyloom" / "audit.jsonl"


class AuditLog:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def append(self, entries: list[dict]) -> None:
        """Append entries as whole lines (O_APPEND: concurrent writers never interleave a line)."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({"time": time.time(), **e}, sort_keys=True) + "\n" for e in entries)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
