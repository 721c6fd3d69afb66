"""Downloads that resume, verify and never leave half a file under the final name.

A file is fetched into ``NAME.part`` beside its destination. An interrupted download continues
from where that file ends, with an HTTP Range request; a server that ignores Range sends the whole
file again. Once complete, the checksum is verified and the part file is renamed over the
destination, so a crash at any moment leaves either no file or the whole verified one.

``--mirror URL`` (or ``GKL_MIRROR``) replaces the origin (scheme and host) of every source, for
clusters that keep a local copy: ``https://www.cs.toronto.edu/~kriz/x.tar.gz`` with mirror
``http://mirror:8000/gkl`` is fetched from ``http://mirror:8000/gkl/~kriz/x.tar.gz``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from gklcli.errors import GKLError

CHUNK = 1 << 20
TIMEOUT_S = 60


def mirrored(url: str, mirror: Optional[str]) -> str:
    """`url` with its origin replaced by `mirror` (None or empty: `GKL_MIRROR`, else unchanged)."""
    mirror = mirror or os.environ.get("GKL_MIRROR")
    if not mirror:
        return url
    parts = urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, checksum: Optional[tuple[str, str]]) -> bool:
    """Whether `path` has the (algorithm, hex prefix) checksum; torchvision names weights by a sha256 prefix."""
    return checksum is None or file_digest(path, checksum[0]).startswith(checksum[1])


def download(url: str, dest: Path, *, checksum: Optional[tuple[str, str]] = None, source: str = "",
             progress: Optional[Callable[[int, Optional[int]], None]] = None, headers: Optional[dict[str, str]] = None,
             where: str = "") -> Path:
    """Fetch `url` to `dest` (resuming DEST.part) and verify `checksum` = (algorithm, hex or hex prefix).

    An existing `dest` that verifies is kept. `progress(done, total)` follows the bytes. Errors are one
    line naming `source`, the URL and where to put the file by hand (`where`, default `dest`)."""
    dest = Path(dest)
    if dest.is_file() and _matches(dest, checksum):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "gkl", **(headers or {}), **({"Range": f"bytes={have}-"} if have else {})})
    hand = f"download it by hand and put it at {where or dest}"
    total: Optional[int] = None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            resumed = have and response.status == 206
            length = response.headers.get("Content-Length")
            total = (have if resumed else 0) + int(length) if length is not None else None
            done = have if resumed else 0
            with open(part, "ab" if resumed else "wb") as fh:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    except urllib.error.HTTPError as error:
        if not (error.code == 416 and have):  # 416 with a part file: it is already whole; verify it below
            raise GKLError(f"{source}: {url}: HTTP {error.code} {error.reason}; {hand}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise GKLError(f"{source}: {url}: cannot download ({reason}); rerun to resume, or {hand}") from None
    if total is not None and part.stat().st_size < total:
        raise GKLError(f"{source}: {url}: the connection ended at {part.stat().st_size:,} of {total:,} bytes; rerun to resume")
    if not _matches(part, checksum):
        got = file_digest(part, checksum[0])
        part.unlink()
        raise GKLError(f"{source}: {url}: checksum mismatch ({checksum[0]} {got[:16]}…, expected {checksum[1][:16]}…); "
                       "the download was removed")
    os.replace(part, dest)
    return dest


def safe_extract(archive: Path, into: Path) -> list[str]:
    """Unpack a tar archive, refusing members that would land outside `into` (absolute paths, ``..``,
    links): archives from the internet are untrusted. Returns the top-level names."""
    into = Path(into).resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or (target != into and into not in target.parents):
                raise GKLError(f"{archive}: refusing member {member.name!r} (outside the target folder, or a link)")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python's own guard too, where it has one
        tar.extractall(into, members=members, **kwargs)
    return sorted({Path(m.name).parts[0] for m in members if Path(m.name).parts})


class ByteProgress:
    """A rich progress bar over bytes (MB/s) for one download; silent without a console."""

    def __init__(self, console: Any, label: str):
        self.console, self.label = console, label
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "ByteProgress":
        if self.console is not None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self.bar = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("download", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
