"""One clip never stops a run, and failures.csv is safe: extreme frame shapes, errors in one clip at
every stage, corrupt failures files, planted symlinks and formula cells. Real clips and weights."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli as cli_module
import outputs
from extract import clips, embed
from extract.embed import Networks
from extract.clips import embed_clips, recipe_of
from extract.pipeline import extract_split
from extract.settings import ExtractSettings
from features.reader import open_features
from features.writer import ShardWriter
from features import failures as failures_module
from features.failures import Failure, file_stamp, read_failures, set_aside, write_failures
from features.layout import FAILURES_FILE
from features.schema import FRAME_ARRAY_NAMES
from features.tools import recorded_failures, validate
from manifests.manifest import ClipEntry, write_manifest
from tests.cli_runs import run_cli
from tests.conftest import QUIET
from tests.feature_files import write_planted_set
from tests.media import moving_face, write_clip

# Valid videos (libx264 in 4:4:4 takes odd sides) whose frames no network was made for.
EXTREME_SHAPES = ((1, 10000), (10000, 1), (2, 10000), (10000, 2), (8, 8), (1, 1))
GREY = 128


def gradient(height: int, width: int) -> np.ndarray:
    """A smooth RGB picture of any size (compresses to little, unlike noise)."""
    rows, cols = np.meshgrid(np.linspace(0, 255, height), np.linspace(0, 255, width), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 90)], axis=-1).astype(np.uint8)


def extreme_clip(path: Path, height: int, width: int) -> Path:
    return write_clip(path, [gradient(height, width)] * 5, pix_fmt="yuv444p")


@pytest.fixture(scope="module")
def three_clips(tmp_path_factory):
    """A face, a grey clip (the one the tests make fail), another face: 3 sampled frames each."""
    folder = tmp_path_factory.mktemp("three")
    grey = [np.full((360, 640, 3), GREY, np.uint8)] * 15
    return [
        ClipEntry("a-face", write_clip(folder / "a.mp4", moving_face("coffee", frames=15)), "happy", "train"),
        ClipEntry("b-grey", write_clip(folder / "b.mp4", grey), "neutral", "train"),
        ClipEntry("c-face", write_clip(folder / "c.mp4", moving_face("rocket", frames=15)), "happy", "train"),
    ]


# A batch of 8 frames: the three clips' windows (3 frames each) share one CNN call.
SETTINGS = ExtractSettings("train", context_backbone="mobilenet_v2", device="cpu", batch_size=8)
ALONE = 3  # frames a batch: the same windows, each in CNN calls of its own


def embedded(entries: list[ClipEntry], networks: Networks, batch_size: int = SETTINGS.batch_size) -> list:
    """Every clip's features or failure, by SETTINGS' recipe, in batches of `batch_size` frames."""
    return list(embed_clips(entries, networks, recipe_of(SETTINGS), batch_size))


@pytest.fixture(scope="module")
def clean(three_clips, networks):
    """Run -> clip id -> features, for runs without errors of some of the clips, in CNN calls of some sizes."""
    runs = {
        "all three": embedded(three_clips, networks),
        "without the grey clip": embedded(three_clips[::2], networks),
        "each window alone": embedded(three_clips, networks, ALONE),
    }
    together = runs["all three"]
    assert [r.clip_id for r in together] == ["a-face", "b-grey", "c-face"]
    assert together[0].has_face.all() and not together[1].has_face.any() and together[2].has_face.all()
    return {name: {r.clip_id: r for r in results} for name, results in runs.items()}


POISON = RuntimeError("poisoned\n  (second line of the message)")


def poisoned(real, is_the_grey_clips, error: BaseException = POISON):
    """`real`, raising `error` (as a broken library might) when given what only the grey clip has."""

    def call(*args, **kwargs):
        if is_the_grey_clips(*args):
            raise error
        return real(*args, **kwargs)

    return call


def has_grey_frame(frames, *rest) -> bool:
    pixels = torch.as_tensor(frames)
    return bool(pixels.reshape(len(pixels), -1).float().std(dim=1).lt(1.0).any())


class Replaced:
    """A real network with some of its methods replaced."""

    def __init__(self, network, **methods):
        self.network = network
        vars(self).update(methods)

    def __getattr__(self, name):
        return getattr(self.network, name)


def networks_poisoned_at(stage: str, networks: Networks, monkeypatch) -> Networks:
    if stage == "decode":
        monkeypatch.setattr(clips, "probe", poisoned(clips.probe, lambda path: path.name == "b.mp4"))
    if stage == "assemble":
        no_face_at_all = lambda found, area: not any(len(d.boxes) for d in found)  # noqa: E731
        monkeypatch.setattr(embed, "choose_main_face", poisoned(embed.choose_main_face, no_face_at_all))
    detector, context = networks.detector, networks.context_cnn
    if stage == "detect":
        detector = Replaced(detector, detect=poisoned(detector.detect, has_grey_frame))
    if stage == "embed":
        context = Replaced(context, embed=poisoned(context.embed, has_grey_frame))
    return Networks(detector, networks.face_cnn, context)


def assert_same_features(got, expected) -> None:
    for name in FRAME_ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=f"{got.clip_id} {name}")


def assert_close_features(got, expected) -> None:
    """Equal detections; CNN features within the rounding of CNN calls of other sizes."""
    for name in ("timestamps", "has_face", "box", "score", "landmarks"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=f"{got.clip_id} {name}")
    for name in ("face", "face_map", "context"):
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-5,
                                   err_msg=f"{got.clip_id} {name}")


# The clean run whose CNN calls group the other clips' frames as the run with the error does. The
# CPU kernels here round a frame differently in calls of other sizes (by up to 5e-7), so that is
# the run the other clips must equal bit for bit.
SAME_CNN_CALLS = {
    "decode": "without the grey clip",  # its frames never reach the CNNs
    "detect": "without the grey clip",
    "embed": "each window alone",  # the shared call raised: each window is run alone
    "assemble": "all three",  # after the CNNs
}


@pytest.mark.parametrize("stage", SAME_CNN_CALLS)
def test_an_error_in_one_clip_fails_that_clip_only(stage, three_clips, networks, clean, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="extract.clips"):
        results = embedded(three_clips, networks_poisoned_at(stage, networks, monkeypatch))
    assert [type(r).__name__ for r in results] == ["ClipFeatures", "Failure", "ClipFeatures"]
    failure = results[1]
    assert (failure.clip_id, failure.stage, failure.path) == ("b-grey", stage, str(three_clips[1].path))
    assert failure.error == "RuntimeError: poisoned (second line of the message)"
    assert failure.file_stamp == file_stamp(three_clips[1].path)
    for got in (results[0], results[2]):
        assert_same_features(got, clean[SAME_CNN_CALLS[stage]][got.clip_id])
        assert_close_features(got, clean["all three"][got.clip_id])
    logged = [r for r in caplog.records if "b-grey" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO and logged[0].exc_info[1] is POISON


def test_an_interrupt_in_one_clip_stops_the_run(three_clips, networks):
    detector = Replaced(networks.detector, detect=poisoned(networks.detector.detect, has_grey_frame,
                                                           KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        embedded(three_clips, Networks(detector, networks.face_cnn, networks.context_cnn))


def test_windows_are_capped_in_bytes_and_those_of_usual_clips_are_unchanged(three_clips, networks, clean,
                                                                           monkeypatch):
    """Up to 1280x720, windows keep --batch-size (64) frames, so features are bitwise those of a
    run without the cap; windows of one frame find the same faces, and features within rounding."""
    assert all(clips.WINDOW_BYTES // (height * width * 3) >= 64 for height, width in ((360, 640), (720, 1280)))
    monkeypatch.setattr(clips, "WINDOW_BYTES", 1 << 62)
    for got in embedded(three_clips, networks):
        assert_same_features(got, clean["all three"][got.clip_id])
    frame_bytes = 400 * 600 * 3  # the coffee photo behind clip a
    assert [len(stamps) for _, stamps in clips._windows(three_clips[0].path, 5.0, 64)] == [3]
    monkeypatch.setattr(clips, "WINDOW_BYTES", frame_bytes)
    assert [len(stamps) for _, stamps in clips._windows(three_clips[0].path, 5.0, 64)] == [1, 1, 1]
    for got in embedded(three_clips, networks):
        assert_close_features(got, clean["all three"][got.clip_id])


def refusing_the_grey_clip(monkeypatch) -> None:
    real_add = ShardWriter.add_clip

    def add_clip(writer, clip):
        if clip.clip_id == "b-grey":
            raise ValueError(f"clip {clip.clip_id!r}: refused")
        real_add(writer, clip)

    monkeypatch.setattr(ShardWriter, "add_clip", add_clip)


def extract_settings(clips: list[ClipEntry], folder: Path) -> ExtractSettings:
    write_manifest(clips, folder / "m.csv")
    return dataclasses.replace(SETTINGS, manifest=folder / "m.csv", out=folder / "out")


def test_a_clip_the_writer_refuses_fails_and_is_not_retried_while_unchanged(three_clips, clean, tmp_path,
                                                                             monkeypatch):
    settings = extract_settings(three_clips, tmp_path)
    refusing_the_grey_clip(monkeypatch)
    summary = extract_split(settings, **QUIET)
    assert (summary.done, [(f.clip_id, f.stage, f.error) for f in summary.failures]) == (
        2, [("b-grey", "store", "ValueError: clip 'b-grey': refused")])
    folder = settings.folder
    assert validate(folder) == [] and [f.clip_id for f in read_failures(folder / FAILURES_FILE)] == ["b-grey"]
    with open_features(folder) as stored:
        assert stored.clip_ids == ["a-face", "c-face"]
        for clip_id in stored.clip_ids:
            got, expected = stored[clip_id], clean["all three"][clip_id]
            for name in FRAME_ARRAY_NAMES:
                np.testing.assert_array_equal(got[name], getattr(expected, name).astype(got[name].dtype))
    monkeypatch.undo()
    again = extract_split(settings, **QUIET)
    assert (again.done, again.skipped, again.earlier_failures) == (0, 2, 1), "any stage: not retried while unchanged"


def test_a_shard_whose_every_clip_is_refused_is_not_written(three_clips, tmp_path, monkeypatch):
    settings = extract_settings(three_clips[1:2], tmp_path)
    refusing_the_grey_clip(monkeypatch)
    summary = extract_split(settings, **QUIET)
    assert (summary.done, len(summary.failures)) == (0, 1)
    assert not [p.name for p in settings.folder.iterdir() if ".h5" in p.name], "no shard, no temporary file"


@pytest.mark.usefixtures("extraction_weights")
def test_a_failed_clip_is_retried_once_its_file_changes_and_only_then(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_text("not a video")
    settings = extract_settings([ClipEntry("clip", video, "happy", "train")], tmp_path)
    run = lambda: extract_split(settings, **QUIET)  # noqa: E731
    outcome = lambda summary: (summary.done, summary.earlier_failures, [f.stage for f in summary.failures])  # noqa: E731
    assert outcome(run()) == (0, 0, ["decode"])
    assert outcome(run()) == (0, 1, ["decode"]), "unchanged: not retried"
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes, newer
    assert outcome(run()) == (0, 0, ["decode"]), "touched: retried, and failing again"
    assert outcome(run()) == (0, 1, ["decode"])
    write_clip(video, moving_face("coffee", frames=5))  # replaced by a good video
    assert outcome(run()) == (1, 0, [])
    assert read_failures(settings.folder / FAILURES_FILE) == []
    with open_features(settings.folder) as stored:
        assert stored.clip_ids == ["clip"]


@pytest.mark.usefixtures("extraction_weights")
def test_extreme_frame_shapes_between_good_clips_are_extracted(tmp_path):
    entries = [ClipEntry("first", write_clip(tmp_path / "first.mp4", moving_face("coffee", frames=10)), "happy",
                         "train")]
    for height, width in EXTREME_SHAPES:
        path = extreme_clip(tmp_path / f"{height}x{width}.mp4", height, width)
        entries.append(ClipEntry(f"{height}x{width}", path, "neutral", "train"))
    entries.append(ClipEntry("last", write_clip(tmp_path / "last.mp4", moving_face("rocket", frames=10)), "happy",
                             "train"))
    manifest = tmp_path / "m.csv"
    write_manifest(entries, manifest)
    args = ["extract", "--manifest", manifest, "--split", "train", "--out", tmp_path / "out", "--context-backbone",
            "mobilenet_v2", "--detect-every", "3", "--device", "cpu", "--quiet"]
    status, stdout, stderr = run_cli(*args)
    assert status == 0, stderr
    assert "8 clips extracted, 0 already done, 0 failed" in stdout
    folder = tmp_path / "out" / "train"
    assert read_failures(folder / FAILURES_FILE) == [] and validate(folder) == []
    with open_features(folder) as stored:
        assert stored.clip_ids == [e.clip_id for e in entries]
        assert stored["first"]["has_face"].all() and stored["last"]["has_face"].all()
        for height, width in EXTREME_SHAPES:
            clip = stored[f"{height}x{width}"]
            assert len(clip["timestamps"]) == 1 and not clip["has_face"].any(), "no face is a fine answer"
    status, stdout, stderr = run_cli(*args)
    assert status == 0 and "0 clips extracted, 8 already done, 0 failed" in stdout, stderr


GARBAGE = {
    "binary": bytes(range(256)) * 4,
    "wrong header": b"clip,path,stage\nbroken,broken.mp4,decode\n",
    "short row": b"clip_id,path,stage,error,file_stamp\nbroken,broken.mp4,decode\n",
    "unknown stage": b"clip_id,path,stage,error,file_stamp\nbroken,broken.mp4,exploded,boom,{stamp}\n",
    "stamp of another form": b"clip_id,path,stage,error,file_stamp\nbroken,broken.mp4,decode,boom,yesterday\n",
    "formula injection":
        b'clip_id,path,stage,error,file_stamp\nbroken,broken.mp4,decode,"=HYPERLINK(""http://x"")",{stamp}\n',
    "unclosed quote": b'clip_id,path,stage,error,file_stamp\nbroken,broken.mp4,decode,"boom,{stamp}\n',
}


@pytest.fixture(scope="module")
def broken_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    (folder / "broken.mp4").write_text("not a video")
    write_manifest([ClipEntry("broken", folder / "broken.mp4", "angry", "train")], folder / "m.csv")
    return folder / "m.csv"


@pytest.mark.usefixtures("extraction_weights")
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_corrupt_failures_file_is_set_aside_with_one_warning_and_its_clips_retried(kind, broken_clip, tmp_path):
    folder = tmp_path / "out" / "train"
    folder.mkdir(parents=True)
    garbage = GARBAGE[kind].replace(b"{stamp}", file_stamp(broken_clip.parent / "broken.mp4").encode())
    (folder / FAILURES_FILE).write_bytes(garbage)
    lines: list[str] = []
    settings = ExtractSettings("train", manifest=broken_clip, out=tmp_path / "out", context_backbone="mobilenet_v2",
                               device="cpu")
    summary = extract_split(settings, progress=False, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {folder / FAILURES_FILE} is unreadable ("), lines
    aside = [p for p in folder.iterdir() if p.name.startswith(f"{FAILURES_FILE}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage and aside[0].name in lines[0]
    assert summary.earlier_failures == 0 and [f.clip_id for f in summary.failures] == ["broken"], "retried"
    assert [f.clip_id for f in read_failures(folder / FAILURES_FILE)] == ["broken"]


def test_a_failures_file_that_is_a_symlink_is_neither_read_nor_written_through(broken_clip, tmp_path):
    victim = tmp_path / "victim.csv"
    victim.write_text("clip_id,path,stage,error,file_stamp\n")
    folder = tmp_path / "out" / "train"
    folder.mkdir(parents=True)
    (folder / FAILURES_FILE).symlink_to(victim)
    lines: list[str] = []
    settings = ExtractSettings("train", manifest=broken_clip, out=tmp_path / "out", context_backbone="mobilenet_v2",
                               device="cpu")
    extract_split(settings, progress=False, log=lines.append)
    assert len(lines) == 1 and "is unreadable (a symbolic link)" in lines[0]
    assert victim.read_text() == "clip_id,path,stage,error,file_stamp\n"
    assert not (folder / FAILURES_FILE).is_symlink() and len(read_failures(folder / FAILURES_FILE)) == 1


@pytest.mark.parametrize("kind", ["binary", "formula injection"])
def test_inspect_says_a_corrupt_failures_file_is_unreadable_in_one_line(kind, tmp_path):
    folder = write_planted_set(tmp_path, "face", {"train": 2}) / "train"
    (folder / FAILURES_FILE).write_bytes(GARBAGE[kind].replace(b"{stamp}", b"missing"))
    done = CliRunner().invoke(cli_module.cli, ["features", "inspect", str(folder)])
    assert done.exit_code == 0, done.output
    about = [line for line in done.output.splitlines() if FAILURES_FILE in line]
    assert len(about) == 1 and "unreadable (" in about[0], about
    assert list(recorded_failures(folder).values())[0].startswith("unreadable (")
    assert (folder / FAILURES_FILE).read_bytes() == GARBAGE[kind].replace(b"{stamp}", b"missing"), "read-only"


def test_set_aside_never_replaces_a_file(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2027, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(failures_module, "datetime", Frozen)
    earlier = tmp_path / f"{FAILURES_FILE}.corrupt-20270102T030405Z"
    earlier.write_text("set aside before")
    (tmp_path / FAILURES_FILE).write_text("garbage")
    aside = set_aside(tmp_path / FAILURES_FILE)
    assert aside.name == f"{FAILURES_FILE}.corrupt-20270102T030405Z-2" and aside.read_text() == "garbage"
    assert earlier.read_text() == "set aside before" and not (tmp_path / FAILURES_FILE).exists()


def test_the_temporary_file_is_never_a_planted_symlink(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    folder = tmp_path / "out"
    folder.mkdir()
    tokens = iter(["beef", "cafe"])
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda size: next(tokens))
    planted = folder / f".{FAILURES_FILE}.beef{outputs.TEMP_SUFFIX}"
    planted.symlink_to(victim)
    failure = Failure("x", "x.mp4", "decode", "boom", "missing")
    write_failures(folder, [failure])
    assert victim.read_text() == "not yours" and planted.is_symlink()
    assert read_failures(folder / FAILURES_FILE) == [failure]
    assert not (folder / f".{FAILURES_FILE}.cafe{outputs.TEMP_SUFFIX}").exists()


def test_formula_cells_are_neutralised_and_read_back_as_they_were(tmp_path):
    failures = [
        Failure('=HYPERLINK("x")', "/videos/a.mp4", "detect", "@SUM(1)", "12:34"),
        Failure("-abc", "+1.mp4", "store", "'quoted", "missing"),
        Failure("plain", "plain.mp4", "decode", "a, b and \"c\"", "0:0"),
    ]
    write_failures(tmp_path, failures)
    with open(tmp_path / FAILURES_FILE, newline="", encoding="utf-8") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert "'=HYPERLINK(\"x\")" in cells and "''quoted" in cells
    assert read_failures(tmp_path / FAILURES_FILE) == failures
