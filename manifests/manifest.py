"""Manifests: the CSV list of clips that every stage reads.

Columns `clip_id,path,label,split` are required, in any order; any other column is kept and
written back unchanged. `path` is absolute or relative to the manifest's folder; `label` is a
CHEAVD 2.0 class or an alias of one (canonicalised on reading), or empty for an unlabelled clip.

Reading validates the whole file and reports every problem at once, each with its CSV line, so
a user fixes a broken manifest in one pass instead of one error per run.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from errors import UserError
from manifests.labels import UnknownLabel, canonical_label
from manifests.spreadsheet import neutralised, restored
from outputs import OutputError, plain_name_problem, write_atomically

REQUIRED_COLUMNS = ("clip_id", "path", "label", "split")
REBUILD_COMMANDS = "`python cli.py manifest cheavd --root DIR` (or `python cli.py manifest folder --root DIR`)"


@dataclass(frozen=True)
class ClipEntry:
    clip_id: str
    path: Path  # absolute
    label: str | None  # a CHEAVD 2.0 class; None for an unlabelled clip
    split: str | None  # None for a video given to predict by itself
    line: int = 0  # the manifest line it was read from (2 = first data row); 0 when not read from a file
    extra: tuple[tuple[str, str], ...] = ()  # the manifest's other columns, as (column, value)


class ManifestError(UserError):
    """Problems a user can fix in a manifest or a dataset: a summary line, one line per problem, the fix."""

    def __init__(self, subject: str, problems: Sequence[str], fix: str):
        self.problems = list(problems)
        count = f"{len(self.problems)} problem{'' if len(self.problems) == 1 else 's'}"
        super().__init__("\n".join([f"{subject}: {count}", *(f"  {p}" for p in self.problems), fix]))


def read_text(path: Path) -> str:
    """A text file's content: UTF-8 with or without a BOM, else GBK (common for Chinese files).

    GB18030 is used for the fallback because it decodes everything GBK and GB2312 do.
    Raises UnicodeDecodeError when the file is neither.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("gb18030")


def read_manifest(path: str | os.PathLike, split: str | None = None, check_files: bool = True) -> list[ClipEntry]:
    """The clips of `split` (all when None) in file order, after validating the whole manifest.

    Files are checked for the returned clips only, so one split can be used on a machine that
    holds only that split's videos.
    """
    path = Path(path).absolute()
    frame, problems = _load_frame(path)
    entries: list[ClipEntry] = []
    if frame is not None:
        rows = list(_data_rows(frame))
        problems += _missing_column_problems(frame.columns)
        first_line: dict[str, int] = {}
        for line, row in rows:
            problems += _duplicate_problems(line, row.get("clip_id", ""), first_line)
            entry, row_problems = _entry_from_row(line, row, path.parent)
            problems += row_problems
            if entry is not None:
                entries.append(entry)
        if split is not None:
            problems += _split_problems(split, {row.get("split", "") for _, row in rows} - {""})
            entries = [entry for entry in entries if entry.split == split]
        if check_files:
            problems += missing_file_problems(entries)
    if problems:
        raise ManifestError(f"manifest {path}", problems, f"Fix: edit {path}, or rebuild it with {REBUILD_COMMANDS}.")
    return entries


def missing_file_problems(entries: Iterable[ClipEntry]) -> list[str]:
    """One line per clip whose file does not exist, with its manifest line."""
    return [f"line {e.line}: clip {e.clip_id!r}: file not found: {e.path}" for e in entries if not e.path.is_file()]


def write_manifest(entries: Iterable[ClipEntry], path: str | os.PathLike, replace: bool = True) -> None:
    """Write `entries` as a manifest at `path`, atomically: a reader never sees a half-written file.

    Paths inside the manifest's folder are written relative to it, so the folder can be moved
    or shared as a whole; others are written absolute. Cells a spreadsheet would run as a
    formula are neutralised (`manifests.spreadsheet`; reading restores them). With `replace`
    False, an existing file with other content is refused (OutputError) rather than replaced.
    """
    path = Path(path).absolute()
    entries = list(entries)
    duplicated = [clip_id for clip_id, n in Counter(e.clip_id for e in entries).items() if n > 1]
    if duplicated:
        raise ValueError(f"duplicate clip_id in the entries to write: {', '.join(sorted(duplicated))}")
    extra_columns = list(dict.fromkeys(column for entry in entries for column, _ in entry.extra))
    records = [
        {
            "clip_id": entry.clip_id,
            "path": _stored_path(entry.path, path.parent),
            "label": entry.label or "",
            "split": entry.split,
            **dict(entry.extra),
        }
        for entry in entries
    ]
    frame = pd.DataFrame(records, columns=[*REQUIRED_COLUMNS, *extra_columns]).fillna("").astype(str)
    text = frame.apply(lambda column: column.map(neutralised)).to_csv(index=False, lineterminator="\n")
    if not replace and path.exists() and _text_of(path) != text:
        raise OutputError(f"{path} exists with other content: choose another --out, or pass --overwrite to replace it")
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _load_frame(path: Path) -> tuple[pd.DataFrame | None, list[str]]:
    if not path.is_file():
        return None, ["file not found"]
    try:
        text = read_text(path)
    except UnicodeDecodeError:
        return None, ["not a text file (neither UTF-8 nor GBK)"]
    if not text.strip():
        return None, ["the file is empty (a manifest starts with the header clip_id,path,label,split)"]
    try:
        with warnings.catch_warnings():
            # pandas only warns, and drops cells, when the first data row is longer than the header.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # Every cell a string, empty cells "", blank lines kept as rows: row i is on line i + 2.
            frame = pd.read_csv(
                io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False
            )
    except pd.errors.ParserWarning:
        return None, ["not a valid CSV file: the first data row has more cells than the header"]
    except pd.errors.ParserError as exc:
        return None, [f"not a valid CSV file: {str(exc).strip()}"]
    frame.columns = [str(column).strip() for column in frame.columns]
    return frame, []


def _data_rows(frame: pd.DataFrame) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) for each non-blank data row, required cells stripped of whitespace."""
    for index, record in enumerate(frame.to_dict("records")):
        if any(value.strip() for value in record.values()):
            record = {k: restored(v.strip() if k in REQUIRED_COLUMNS else v) for k, v in record.items()}
            yield index + 2, record


def _missing_column_problems(columns: Sequence[str]) -> list[str]:
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if not missing:
        return []
    return [
        f"line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
        f"(the header has: {', '.join(columns)}; required: {', '.join(REQUIRED_COLUMNS)})"
    ]


def _duplicate_problems(line: int, clip_id: str, first_line: dict[str, int]) -> list[str]:
    """A problem when `clip_id` was already seen; `first_line` records where each id first appeared."""
    if not clip_id:
        return []
    if clip_id in first_line:
        return [f"line {line}: clip {clip_id!r}: duplicate clip_id, already on line {first_line[clip_id]}"]
    first_line[clip_id] = line
    return []


def _entry_from_row(line: int, row: dict[str, str], folder: Path) -> tuple[ClipEntry | None, list[str]]:
    """The entry a row describes (None when it cannot be built) and the problems found in the row.

    A cell of a missing column is not reported here: the missing column already is, once.
    """
    clip_id = row.get("clip_id", "")
    where = f"line {line}: clip {clip_id!r}" if clip_id else f"line {line}"
    problems = []
    if "clip_id" in row and not clip_id:
        problems.append(f"line {line}: empty clip_id")
    for column in ("path", "split"):
        if column in row and not row[column]:
            problems.append(f"{where}: empty {column}")
    split_problem = plain_name_problem(row.get("split", "")) if row.get("split") else None
    if split_problem:
        problems.append(f"{where}: split {row['split']!r} cannot name a folder ({split_problem})")
    label = None
    try:
        label = canonical_label(row.get("label", ""))
    except UnknownLabel as exc:
        problems.append(f"{where}: {exc}")
    if problems or any(column not in row for column in REQUIRED_COLUMNS):
        return None, problems
    extra = tuple((column, value) for column, value in row.items() if column not in REQUIRED_COLUMNS)
    path = Path(os.path.normpath(folder / row["path"]))
    return ClipEntry(clip_id, path, label, row["split"], line, extra), []


def _split_problems(split: str, present: set[str]) -> list[str]:
    if split in present:
        return []
    have = ", ".join(sorted(present)) if present else "none"
    return [f"split {split!r}: no row has it (splits in this manifest: {have})"]


def _stored_path(clip: Path, folder: Path) -> str:
    if not clip.is_absolute():
        raise ValueError(f"ClipEntry.path must be absolute, got {clip}")
    return clip.relative_to(folder).as_posix() if clip.is_relative_to(folder) else str(clip)
