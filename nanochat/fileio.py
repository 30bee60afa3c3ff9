"""Writing files so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write beside `path`, fsync, and rename over it; an existing file keeps its permissions.

    Readers see the old or the new content, never a mix; no temp file survives a failure.
    """
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old_mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    try:
        # os.open with 0o666 honours the umask for a new file (mkstemp would make it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
