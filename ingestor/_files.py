"""Pure file-name rules and small blocking file helpers for the rolling JSONL files.

Names sort by time and never collide between ingestors::

    sessions-20261125T114233.123456Z-<ingestor_id>-000001.jsonl[.gz|.zst]

Every name that reaches the filesystem (generated here, or read back from ``jsonl_files``) goes through
:func:`safe_path`, so paths stay inside ``jsonl_dir``: no separators, no ``..``, nothing but the pattern.
Hidden temporaries sit beside the final file: ``.<name>.tmp`` for the owner's appends and
``.<name>.recover-<hex>.tmp`` for a regeneration.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, Protocol

Compression = Literal["none", "gzip", "zstd"]

_SUFFIX: Final[dict[Compression, str]] = {"none": ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}
FILE_NAME_RE: Final = re.compile(
    r"^sessions-\d{8}T\d{6}\.\d{6}Z-(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,99})-\d{6,}\.jsonl(?:\.gz|\.zst)?$"
)
TMP_NAME_RE: Final = re.compile(
    r"^\.(?P<name>sessions-.+?\.jsonl(?:\.gz|\.zst)?)(?P<recover>\.recover-[0-9a-f]+)?\.tmp$"
)


def make_file_name(
    ingestor_id: str, counter: int, *, now: datetime | None = None, compression: Compression = "none"
) -> str:
    """A fresh, valid file name (ValueError if ``ingestor_id`` would make an unsafe one)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"sessions-{stamp}-{ingestor_id}-{counter:06d}{_SUFFIX[compression]}"
    check_file_name(name)
    return name


def is_final_name(name: str) -> bool:
    """Whether ``name`` is a finalised JSONL file of an ingestor (never a hidden temporary)."""
    return FILE_NAME_RE.match(name) is not None


def check_file_name(name: str) -> str:
    if "/" in name or "\\" in name or "\x00" in name or ".." in name or not FILE_NAME_RE.fullmatch(name):
        raise ValueError(f"not a valid JSONL file name: {name!r}")
    return name


def safe_path(directory: Path, name: str) -> Path:
    """``directory / name`` after checking ``name``; never a path outside ``directory``."""
    check_file_name(name)
    path = directory / name
    if path.parent != directory:
        raise ValueError(f"{name!r} escapes {directory}")
    return path


def tmp_path(directory: Path, name: str) -> Path:
    return safe_path(directory, name).with_name(f".{name}.tmp")


def recover_tmp_path(directory: Path, name: str, nonce: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{1,32}", nonce):
        raise ValueError("nonce must be hex")
    return safe_path(directory, name).with_name(f".{name}.recover-{nonce}.tmp")


def name_of_tmp(filename: str) -> str | None:
    """The final name a hidden temporary belongs to, or None if it is not one of ours."""
    match = TMP_NAME_RE.fullmatch(filename)
    if match is None:
        return None
    try:
        return check_file_name(match.group("name"))
    except ValueError:
        return None


def is_recover_tmp(filename: str) -> bool:
    """Whether ``filename`` is a regeneration's temporary (``.<name>.recover-<hex>.tmp``)."""
    match = TMP_NAME_RE.fullmatch(filename)
    return match is not None and match.group("recover") is not None


def compression_of(name: str) -> Compression:
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".zst"):
        return "zstd"
    return "none"


def compress(data: bytes, compression: Compression) -> bytes:
    """One self-contained gzip member / zstd frame: appended members still make one valid file."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard

        result: bytes = zstandard.ZstdCompressor(level=3).compress(data)
        return result
    return data


def should_roll(*, size: int, age_s: float, max_bytes: int, max_age_s: float, sessions: int) -> bool:
    """Roll a file that holds at least one session once it is big enough or old enough."""
    return sessions > 0 and (size >= max_bytes or age_s >= max_age_s)


def read_lines(path: Path) -> list[bytes]:
    """Every non-blank line of a (possibly compressed) JSONL file, without the newline."""
    raw = path.read_bytes()
    compression = compression_of(path.name)
    if compression == "gzip":
        raw = gzip.decompress(raw)
    elif compression == "zstd":
        import io

        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
            raw = reader.read()
    return [line for line in raw.split(b"\n") if line.strip()]


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


# --- blocking helpers (run in a thread) --------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_at(path: Path, offset: int, data: bytes) -> int:
    """Cut ``path`` back to ``offset`` (dropping a half-written earlier attempt), append, fsync; new size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset + len(data)


@contextmanager
def open_writer(path: Path, compression: Compression) -> Iterator[Writer]:
    """A binary writer that compresses as ``compression`` says; the file is fsynced on clean exit."""
    with path.open("wb") as raw:
        if compression == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                yield gz
        elif compression == "zstd":
            import zstandard

            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zw:
                yield zw
        else:
            yield raw
        raw.flush()
        os.fsync(raw.fileno())


def write_file(path: Path, chunks: Iterable[bytes], compression: Compression) -> None:
    with open_writer(path, compression) as out:
        for chunk in chunks:
            out.write(chunk)


def publish(tmp: Path, final: Path) -> None:
    """Atomically give ``tmp`` its final name and make the rename durable."""
    tmp.replace(final)
    fsync_dir(final.parent)


def write_and_publish(tmp: Path, final: Path, chunks: Iterable[bytes], compression: Compression) -> None:
    """Write ``tmp`` and :func:`publish` it as ``final``. If anything fails (a full disk), ``tmp`` is
    deleted before the error propagates, so failed attempts leave no temporaries behind."""
    try:
        write_file(tmp, chunks, compression)
        publish(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
