"""The failures file: the clips of a folder that the extractor could not extract (features/README.md).

`failures.csv` sits beside the shards: the header `clip_id,path,stage,error,file_stamp`, then
one row per clip. A resumed extraction skips a listed clip while its file is unchanged.

The file comes back to us from disk, so it is hostile until checked: reading takes only a
file as `write_failures` writes it (a regular file of bounded size, UTF-8, the exact header,
complete rows, known stages, stamps of the writer's form, cells neutralised for spreadsheets)
and names the file and what is wrong otherwise. Writing never follows a planted symlink.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from itertools import count
from pathlib import Path
from typing import Callable

from features.layout import FAILURES_FILE
from features.schema import FeatureFileError
from manifests.spreadsheet import neutralised, restored
from outputs import write_atomically

# Where a clip's extraction failed, in the order a clip goes through them.
STAGES = ("decode", "detect", "embed", "assemble", "store")
MISSING_FILE_STAMP = "missing"
_FILE_STAMP = re.compile(r"\d+:\d+")  # size:mtime_ns, as file_stamp writes it
# Rows are a few hundred bytes (errors are cut to MAX_ERROR_CHARS): this holds about 200,000
# of them, and keeps a planted huge file from being read into memory.
MAX_FILE_BYTES = 64 << 20
MAX_ERROR_CHARS = 1000
CORRUPT_TAG = ".corrupt-"


@dataclass(frozen=True)
class Failure:
    """One clip the extractor could not extract: where (`stage`, one of STAGES) and why (`error`, one line)."""

    clip_id: str
    path: str
    stage: str
    error: str
    file_stamp: str  # the file's "SIZE:MTIME_NS" when it failed, or "missing"


FIELDS = tuple(field.name for field in fields(Failure))


class CorruptFailuresFile(FeatureFileError):
    """A failures file that `write_failures` did not write: the file and the `reason`, one line."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def file_stamp(path: Path) -> str:
    """Size and modification time: a failed clip is retried only once its file has changed."""
    try:
        st = path.stat()
    except OSError:
        return MISSING_FILE_STAMP
    return f"{st.st_size}:{st.st_mtime_ns}"


def one_line(message: str) -> str:
    """`message` as a failure's error: its lines joined, at most MAX_ERROR_CHARS."""
    line = " ".join(message.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def read_failures(file: Path) -> list[Failure]:
    """The failures `file` lists ([] when it does not exist); CorruptFailuresFile if we did not write it."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise CorruptFailuresFile(file, reason) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFailuresFile(file, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise CorruptFailuresFile(file, f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), strict=True))
    except UnicodeDecodeError:
        raise CorruptFailuresFile(file, "not UTF-8 text") from None
    except csv.Error as exc:
        raise CorruptFailuresFile(file, f"not CSV ({exc})") from None
    if not rows or tuple(rows[0]) != FIELDS:
        raise CorruptFailuresFile(file, f"the header is not {','.join(FIELDS)}")
    return [_failure_of(file, line, row) for line, row in enumerate(rows[1:], start=2)]


def _failure_of(file: Path, line: int, row: list[str]) -> Failure:
    if len(row) != len(FIELDS):
        raise CorruptFailuresFile(file, f"line {line}: {len(row)} cells, not {len(FIELDS)}")
    if any(neutralised(restored(cell)) != cell for cell in row):
        raise CorruptFailuresFile(file, f"line {line}: a cell not neutralised for spreadsheets (a formula?)")
    failure = Failure(*map(restored, row))
    if not failure.clip_id:
        raise CorruptFailuresFile(file, f"line {line}: no clip_id")
    if failure.stage not in STAGES:
        raise CorruptFailuresFile(file, f"line {line}: stage {failure.stage[:40]!r} is not one of {', '.join(STAGES)}")
    if failure.file_stamp != MISSING_FILE_STAMP and not _FILE_STAMP.fullmatch(failure.file_stamp):
        raise CorruptFailuresFile(file, f"line {line}: file_stamp {failure.file_stamp[:40]!r} is not SIZE:MTIME_NS")
    return failure


def failures_to_resume(folder: Path, warn: Callable[[str], None]) -> list[Failure]:
    """The failures recorded in `folder`. A corrupt file is renamed aside, with one warning line,
    and counts as empty: its clips are retried rather than the run stopped."""
    try:
        return read_failures(folder / FAILURES_FILE)
    except CorruptFailuresFile as exc:
        aside = set_aside(exc.file)
        warn(f"warning: {exc.file} is unreadable ({exc.reason}); set aside as {aside.name}, so the clips it"
             " listed are tried again")
        return []


def set_aside(file: Path) -> Path:
    """Rename `file` to FILE.corrupt-<UTC time> (a name no file has yet) and return the new path."""
    moment = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    is_folder = file.is_dir() and not file.is_symlink()
    for attempt in count(1):
        aside = file.with_name(f"{file.name}{CORRUPT_TAG}{moment}" + (f"-{attempt}" if attempt > 1 else ""))
        try:
            _reserve(aside, is_folder)
            break
        except FileExistsError:
            continue
    os.replace(file, aside)
    return aside


def _reserve(path: Path, is_folder: bool) -> None:
    """Claim `path` for a rename that must replace nothing: rename() only replaces what is of its kind."""
    if is_folder:
        os.mkdir(path)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))


def write_failures(folder: Path, failures: list[Failure]) -> Path:
    """Write `folder`/failures.csv atomically (a temporary file, then a rename); returns its path."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(FIELDS)
    writer.writerows([neutralised(cell) for cell in astuple(failure)] for failure in failures)
    final = folder / FAILURES_FILE
    write_atomically(final, lambda temporary: temporary.write_text(text.getvalue(), encoding="utf-8", newline=""))
    return final
