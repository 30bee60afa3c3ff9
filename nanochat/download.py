"""Robust single-file downloads: retries with backoff, resume, atomic rename.

A file appears under its final name only once it is complete (and, when the
caller asks, verified); until then it lives as `<name>.part`, which a later
attempt resumes with an HTTP Range request. `file://` URLs are copied the same
way, which is what offline setups and tests use.

Retrying is for errors in the middle of a transfer (a dropped connection, a 503).
A server that cannot be reached at all (no network, a name that does not resolve,
a refused connection) is another matter: `check_reachable` says so in seconds,
so callers probe first and fail with one clear message instead of retrying.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import requests

log = logging.getLogger("nanochat.download")

# Small enough that a dropped connection loses little of what arrived (the read in flight is lost).
CHUNK_BYTES = 1 << 16
# Server errors and throttling are worth retrying; other 4xx (404, 403) are not.
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download that failed for good (after retries, or on a permanent error)."""


class Unreachable(DownloadError):
    """No connection to the server could be opened: offline, unresolvable name, refused port."""


class _Permanent(DownloadError):
    """Retrying cannot help: a missing file, a 404, an unsupported URL."""


class _Corrupt(DownloadError):
    """The bytes arrived but are wrong; resuming them would only keep them wrong."""


def download_file(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    sha256: str | None = None,
    validate: Callable[[Path], None] | None = None,
) -> Path:
    """Fetch `url` to `dest` unless `dest` already exists; return `dest`.

    `validate(path)` may raise to reject a complete-looking but broken file
    (it is then deleted and fetched again). Raises DownloadError when all
    `retries` attempts fail.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            _fetch_to(url, part, timeout)
            _check(part, sha256, validate)
            os.replace(part, dest)
            return dest
        except _Permanent:
            part.unlink(missing_ok=True)
            raise
        except (requests.RequestException, OSError, DownloadError, ValueError) as exc:
            last_error = exc
            if isinstance(exc, _Corrupt):
                part.unlink(missing_ok=True)
            if attempt < retries:
                wait = backoff * 2 ** (attempt - 1)
                log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", dest.name, attempt, retries, exc, wait)
                time.sleep(wait)
    raise DownloadError(f"{url}: gave up after {retries} attempts: {last_error}")



def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise Unreachable unless a TCP connection to the server of `url` opens within `timeout` seconds.

    Through the proxy when the environment sets one for this URL (then the proxy is what must answer).
    Only http(s) URLs are probed. Name resolution has no timeout of its own: it is the system resolver's.
    """
    parts = urlparse(url)
    if parts.scheme not in ("http", "https"):
        return
    proxy = requests.utils.get_environ_proxies(url).get(parts.scheme)
    target = urlparse(proxy) if proxy else parts
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as exc:  # gaierror (name), ConnectionRefusedError, TimeoutError, unreachable network
        reason = exc.strerror or str(exc) or type(exc).__name__
        via = " (the proxy for it)" if proxy else ""
        raise Unreachable(f"{target.hostname}:{port}{via} is unreachable: {reason}") from exc


def _check(part: Path, sha256: str | None, validate: Callable[[Path], None] | None) -> None:
    if sha256 is not None:
        digest = file_sha256(part)
        if digest != sha256.lower():
            raise _Corrupt(f"checksum mismatch: got {digest}, expected {sha256}")
    if validate is not None:
        try:
            validate(part)
        except Exception as exc:  # any complaint from the validator means: not a usable file
            raise _Corrupt(f"downloaded file is not valid: {exc}") from exc


def _fetch_to(url: str, part: Path, timeout: float) -> None:
    scheme = urlparse(url).scheme
    if scheme == "file":
        _copy_local(url, part)
    elif scheme in ("http", "https"):
        _fetch_http(url, part, timeout)
    else:
        raise _Permanent(f"unsupported URL scheme in {url!r} (use http, https or file)")


def _copy_local(url: str, part: Path) -> None:
    source = Path(unquote(urlparse(url).path))
    if not source.is_file():
        raise _Permanent(f"no such file: {source}")
    with open(source, "rb") as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


def _fetch_http(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416:  # our partial file is already the whole thing, or garbage
            raise _Corrupt("server rejected the resume range")
        if resp.status_code in RETRYABLE_STATUS:
            raise DownloadError(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise _Permanent(f"{url}: HTTP {resp.status_code}")
        resuming = resp.status_code == 206
        expected = _expected_total(resp, have if resuming else 0)
        with open(part, "ab" if resuming else "wb") as out:
            for chunk in resp.iter_content(CHUNK_BYTES):
                out.write(chunk)
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"connection closed early: {size} of {expected} bytes")


def _expected_total(resp: requests.Response, offset: int) -> int | None:
    # Content-Length is what this response carries; Content-Encoding would make it lie.
    length = resp.headers.get("Content-Length")
    if length is None or resp.headers.get("Content-Encoding"):
        return None
    return offset + int(length)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()
