"""`features report FOLDER... --out DIR`: DIR/index.html, one self-contained page showing whether an
extraction went right, and the overview plots beside it as PNG files.

Reads only what it draws: the clip tables, has_face, scores and boxes of every clip (and has_audio,
for a set that hears), and pixels (decoded again from the source videos below the folder the user
names, or stored crops) and stored audio for the clips shown only. Writes only
into DIR, which must be new, empty or an earlier report (else `--overwrite`), each file through a
temporary file renamed into place, the page last: a killed run leaves no half page.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from errors import UserError
from features.reader import absolute, open_features
from outputs import check_output_folder, is_temporary, write_atomically
from report.choice import Chosen, sample, worth_a_look
from report.facts import SetFacts, read_set
from report.figures import OVERVIEWS, overview_png
from report.page import page
from report.settings import DEFAULT_FRAMES, DEFAULT_SAMPLE, PAGE
from report.sheets import ClipSheet, clip_sheet

REPORT_FILES = {PAGE, *(overview.file for overview in OVERVIEWS)}


class ReportError(UserError):
    """A report that cannot be made as asked; one line."""


def writes_into_report(name: str) -> bool:
    """The names a report writes in its folder."""
    return name in REPORT_FILES or is_temporary(name)


def set_names(paths: list[Path]) -> list[str]:
    """How the page names each set: its folder's name, or its whole path where two names would be equal."""
    names = [path.name for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def draw_sheets(paths: list[Path], chosen: list[Chosen], frames: int, videos: Path | None,
                progress: bool) -> dict[tuple[int, str], ClipSheet]:
    """The sheet row of every chosen clip, each decoded once, by (set, clip id)."""
    unique: dict[tuple[int, str], Chosen] = {}
    for choice in chosen:
        unique.setdefault((choice.clip.folder, choice.clip.clip_id), choice)
    with ExitStack() as stack:
        sets = [stack.enter_context(open_features(path)) for path in paths]
        return {
            key: clip_sheet(sets[key[0]], choice, frames, videos)
            for key, choice in tqdm(unique.items(), unit="clip", desc="report: decode", disable=not progress)
        }


def build_report(folders: list[Path], out: Path, sample_size: int = DEFAULT_SAMPLE, frames: int = DEFAULT_FRAMES,
                 overwrite: bool = False, progress: bool = False, videos: Path | None = None) -> Path:
    """Write the report of the feature sets at `folders` into `out`; returns the page's path. Frames
    are decoded from the source videos below `videos` only (None: no video is read).

    FeatureFileError for a folder that is not a feature set, ReportError for one given twice or an `out`
    inside one, OutputError for an `out` holding anything but an earlier report, unless `overwrite`.
    """
    out = check_output_folder(absolute(out), "features report", overwrite, writes_into_report)
    paths = [absolute(folder) for folder in folders]
    twice = [path for number, path in enumerate(paths) if path in paths[:number]]
    if twice:
        raise ReportError(f"{twice[0]} is given twice: name each feature set once")
    holding = [path for path in paths if path == out or path in out.parents]
    if holding:
        # extract, merge and repack refuse a feature folder holding anything but a set's files.
        raise ReportError(f"--out {out} is inside the feature set {holding[0]}: choose a folder outside it")
    sets: list[SetFacts] = [read_set(path, number) for number, path in enumerate(paths)]
    names = set_names(paths)
    clips = [clip for facts in sets for clip in facts.clips]
    worth, applying = worth_a_look(clips)
    sampled = sample(clips, sample_size)
    sheets = draw_sheets(paths, worth + sampled, frames, videos and absolute(videos).resolve(), progress)
    shown = [[dataclasses.replace(sheets[c.clip.folder, c.clip.clip_id], chosen=c) for c in group]
             for group in (worth, sampled)]
    overviews = [(overview, overview_png(overview, sets, names)) for overview in OVERVIEWS]
    out.mkdir(parents=True, exist_ok=True)
    for overview, png in overviews:
        write_atomically(out / overview.file, lambda temporary, png=png: temporary.write_bytes(png))
    text = page(sets, names, overviews, shown[0], applying, shown[1])
    write_atomically(out / PAGE, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return out / PAGE
