"""`features report` on a small real extraction (real photos made into clips, the real networks, one clip with a
real AAC track): the page and its pictures, inspect's numbers, the clips worth a look, the audio strips, no
external reference, videos moved away; and bad inputs, each one line or a page that says so. In-process: the
CLI's own behaviour here is its exit status and its lines, which the in-process runner shows as a subprocess
would."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from extract.audio import TrackReader
from extract.clips import audio_settings
from extract.video import sample_frames
from features import tools
from features.reader import open_features, write_index
from features.recipe import FeatureRecipe
from features.schema import NO_TRACK, AudioTrack, shard_name
from features.writer import ShardWriter
from manifests.manifest import ClipEntry, write_manifest
from report.audio import NO_AUDIO_COLOUR
from report.build import REPORT_FILES, build_report
from report.figures import DPI, OVERVIEWS, PANEL_WIDTH
from report.page import AUDIO_CAPTION
from report.settings import PAGE
from report.sheets import TIMELINE_WIDTH, shown_frames
from tests.cli_runs import one_line_error, run_cli
from tests.feature_files import clip_of, extractor_attrs
from tests.media import (brightness, burst_frames, burst_track, heads_on_scene, moving_face, photo, write_av_clip,
                         write_clip)

FRAME = (270, 480)
FACELESS_ID = "cat/<i>no face</i>"
# A clip id with path characters and markup: it must neither build a path nor reach the page as markup.
JUMPING_ID = "../../escape/<script>jumps</script>"
# The one clip with a track: AAC, 44.1 kHz stereo, starting AUDIO_START s after its first frame (so its first frames
# have no audio), a quiet hum with a 1 kHz burst at BURST (video time), which the frames at 1.6 and 1.8 s hear whole.
VOICED_ID = "voiced"
VOICED_FRAMES = 15  # at 5 fps: 3 s
AUDIO_START, BURST, RATE = 0.6, (1.5, 1.9), 44100


def one_head(face: str, left: int, top: int, scene: str = "coffee") -> np.ndarray:
    return heads_on_scene(scene, FRAME, [(face, left, top, 128)])


def clips() -> dict[str, tuple[list[np.ndarray], int]]:
    """Clip id -> (frames, fps): every sampled frame is one of these at 5 fps; each has no audio track."""
    return {
        "face": (moving_face("coffee", frames=4, step=20), 5),
        FACELESS_ID: ([photo("chelsea")] * 4, 5),
        # The only face passes from Eileen Collins on the left to Grace Hopper on the right.
        JUMPING_ID: ([one_head("eileen_collins", 30, 20)] * 3 + [one_head("grace_hopper", 320, 130)] * 3, 5),
        "half": ([one_head("eileen_collins", 30 + 10 * i, 20) for i in range(3)] + [photo("rocket")[:270, :480]] * 3,
                 5),
    }


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, extraction_weights):
    """A real extraction through the command line, one clip of it missing (a failure); returns its split folder."""
    root = tmp_path_factory.mktemp("report")
    videos = root / "videos"
    videos.mkdir()
    entries = [ClipEntry(clip_id, write_clip(videos / f"{number}.mp4", frames, fps=fps), "happy", "train")
               for number, (clip_id, (frames, fps)) in enumerate(clips().items())]
    track = burst_track(VOICED_FRAMES / 5, RATE, BURST, start=AUDIO_START)
    voiced = write_av_clip(videos / "voiced.mp4", moving_face("coffee", frames=VOICED_FRAMES, step=10), track, RATE,
                           "aac", "stereo", fps=5, audio_start=AUDIO_START)
    entries.append(ClipEntry(VOICED_ID, voiced, "happy", "train"))
    write_manifest(entries + [ClipEntry("lost", videos / "lost.mp4", "sad", "train")], root / "m.csv")
    status, _, stderr = run_cli("extract", "--manifest", root / "m.csv", "--split", "train", "--out", root / "features",
                                "--context-backbone", "mobilenet_v2", "--device", "cpu", "--quiet")
    assert status == 3, stderr
    folder = root / "features" / "train"
    assert f"python cli.py features report {folder} --videos {videos} --out {root / 'features' / 'report-train'}" in stderr
    return folder


@pytest.fixture(scope="module")
def report(extraction):
    """The report of the extraction through the command line, and the page's text."""
    out = extraction.parents[1] / "report"
    status, stdout, stderr = run_cli("features", "report", extraction, "--videos", extraction.parents[1] / "videos",
                                     "--out", out)
    assert status == 0 and stdout == f"wrote {out / PAGE}\n", stderr
    return out, (out / PAGE).read_text(encoding="utf-8")


def pictures(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r"src='data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)'", page)]


def section(page: str, title: str, next_title: str) -> str:
    return page[page.index(f"<h2>{title}</h2>") : page.index(f"<h2>{next_title}</h2>")]


def test_the_page_and_its_pictures_are_readable_images_of_sensible_size(report):
    out, page = report
    assert sorted(path.name for path in out.iterdir()) == sorted(REPORT_FILES), "nothing else, no temporary file"
    for overview in OVERVIEWS:
        with Image.open(out / overview.file) as png:
            png.verify()
        with Image.open(out / overview.file) as png:
            assert png.format == "PNG" and 300 <= png.width <= 3000 and 200 <= png.height <= 2000, overview.file
    shown = pictures(page)
    # 5 overviews; per clip shown (all 5: every one is worth a look or sampled) an audio strip, a timeline, and
    # frames and crops.
    assert len(shown) >= 5 + 5 * 4
    for picture in shown:
        picture.load()
        assert 100 <= picture.width <= 3000 and 10 <= picture.height <= 2000, picture.size


def test_the_numbers_on_the_page_are_inspects(extraction, report):
    _, page = report
    summary = tools.inspect(extraction)
    assert "with a face" in summary and "1 (1 in" in summary, summary  # the failed clip counted
    fields, _, attributes = summary.partition("\nattributes:\n")
    # inspect pads its keys to 14 characters and writes attributes as "  key: value".
    rows = [(line[:14].strip(), line[14:]) for line in fields.splitlines()]
    rows += [line[2:].partition(": ")[::2] for line in attributes.splitlines()]
    assert len(rows) > 30
    for key, value in rows:
        assert f"<td class='key'>{html.escape(key)}</td><td>{html.escape(value)}</td>" in page, (key, value)
    assert "decode</td><td>1</td>" in page and "lost.mp4: file not found" in page


def clip_row(page: str, clip_id: str) -> str:
    """The first contact-sheet row of `clip_id`."""
    start = page.index(f"<div class='clip'><h3>{html.escape(clip_id)}</h3>")
    end = page.find("<div class='clip'>", start + 1)
    return page[start:end if end > 0 else len(page)]


def audio_strip(row: str) -> np.ndarray:
    """The audio strip of a contact-sheet row, RGB."""
    (data,) = re.findall(r"alt='audio' title='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", row)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def frame_columns(strip: np.ndarray, frames: int) -> np.ndarray:
    """(frames, height, 3): the strip's pixel column in the middle of each frame's part of the time axis, which the
    face strip below shares (frame i of T in [i, i + 1) * width / T)."""
    return np.stack([strip[:, int((i + 0.5) * strip.shape[1] / frames)] for i in range(frames)])


def assert_the_burst_is_brightest_and_the_unheard_grey(strip: np.ndarray, stamps: np.ndarray, heard: np.ndarray,
                                                       window: float) -> None:
    columns = frame_columns(strip, len(stamps))
    assert (columns[~heard] == NO_AUDIO_COLOUR).all() and not (columns[heard] == NO_AUDIO_COLOUR).all(axis=(1, 2)).any()
    inside, away = burst_frames(stamps, window, BURST)
    lit = brightness(columns)
    assert inside.sum() == 2 and (away & heard).sum() >= 8
    assert lit[inside].min() > lit[away & heard].max(), lit


def test_a_set_that_hears_shows_its_tracks_and_each_clips_audio_on_its_frames_time(extraction, report):
    _, page = report
    with open_features(extraction) as features:
        voiced = features.read(VOICED_ID, arrays=("timestamps", "has_audio"))
        window = features.attrs["audio_window"]
    stamps, heard = voiced["timestamps"], voiced["has_audio"]
    assert len(stamps) == VOICED_FRAMES and not heard[stamps < AUDIO_START - 0.1].any() and heard[stamps > 0.7].all()
    audio = tools.inspect_summary(extraction).audio
    assert (audio.features, audio.dim, audio.with_track, audio.without_track) == ("logmel", 128, 1, 4)
    assert (audio.codecs, audio.rates, audio.channels, audio.unread) == ({"aac": 1}, {RATE: 1}, {2: 1}, [])
    assert audio.frames_with_audio == heard.sum(), "the other clips have no track"
    share = 100 * heard.sum() / audio.frames
    numbers = section(page, "Numbers", "Overview")
    for key, value in [("audio", "logmel, 128 values a frame"),
                       ("audio frames", f"{heard.sum()} of {audio.frames} with audio ({share:.1f}%)"),
                       ("audio tracks", "1 clip with a track, 4 without"), ("audio codecs", "aac (1 clip)"),
                       ("sample rates", "44100 Hz (1 clip)"), ("channels", "2 (1 clip)"), ("audio unread", "none")]:
        assert f"<td class='key'>{key}</td><td>{value}</td>" in numbers, key
    assert "<h4>Audio not read</h4><p>None: every track found was read whole.</p>" in numbers
    assert AUDIO_CAPTION in page
    row = clip_row(page, VOICED_ID)
    assert f"audio in {heard.sum()} of 15 frames (aac, 44100 Hz, 2 channels)" in row
    strip = audio_strip(row)
    assert strip.shape == (64, TIMELINE_WIDTH, 3)
    assert_the_burst_is_brightest_and_the_unheard_grey(strip, stamps, heard, window)
    for clip_id in ("face", FACELESS_ID, JUMPING_ID, "half"):
        row = clip_row(page, clip_id)
        assert "· no audio track</p>" in row and (audio_strip(row) == NO_AUDIO_COLOUR).all(), clip_id


def hearing_attrs(audio_features: str) -> dict:
    """The attributes of a set extracted at 5 fps with `audio_features`."""
    return extractor_attrs(**audio_settings({"audio_features": audio_features, "audio_rate": 16000,
                                             "audio_window": None, "fps": 5.0}))


EGEMAPS_NOTE = "undecodable audio at 2.12 s (Invalid data found when processing <input>) (and 5 more)"


def egemaps_set(folder: Path, video: Path) -> Path:
    """A set of the voiced clip's real eGeMAPS values (openSMILE's, as extract reads them) in three clips: as heard,
    as if its audio from 2.1 s on were damaged, and as if it had no track."""
    attrs = hearing_attrs("egemaps")
    reader = TrackReader(FeatureRecipe.from_attrs(dict(attrs, context_dtype="float16")))
    stamps = np.array([frame.timestamp for frame in sample_frames(video, 5.0, audio=reader)])
    heard = reader.heard(list(stamps))
    clip = clip_of(VOICED_ID, "happy", np.ones(len(stamps), bool), np.ones((len(stamps), 128), np.float32),
                   np.ones((len(stamps), 64), np.float32))
    clip = dataclasses.replace(clip, source_path=str(video), timestamps=stamps)
    kept = heard.has_audio & (stamps < 2.1)
    clips = [
        dataclasses.replace(clip, audio=heard.audio, has_audio=heard.has_audio, audio_track=heard.track),
        dataclasses.replace(clip, clip_id="damaged", audio=heard.audio * kept[:, None], has_audio=kept,
                            audio_track=AudioTrack("aac", RATE, 2, EGEMAPS_NOTE)),
        dataclasses.replace(clip, clip_id="mute", audio=np.zeros_like(heard.audio), has_audio=np.zeros_like(kept),
                            audio_track=AudioTrack(note=NO_TRACK)),
    ]
    folder.mkdir()
    with ShardWriter(folder / shard_name(0), attrs) as writer:
        for one in clips:
            writer.add_clip(one)
    write_index(folder)
    return folder


def test_an_egemaps_set_shows_each_value_on_its_own_scale_and_the_audio_that_could_not_be_read(extraction, tmp_path):
    video = extraction.parents[1] / "videos" / "voiced.mp4"
    folder = egemaps_set(tmp_path / "train", video)
    page = build_report([folder], tmp_path / "report", videos=video.parent).read_text(encoding="utf-8")
    numbers = section(page, "Numbers", "Overview")
    for key, value in [("audio", "egemaps, 50 values a frame"), ("audio tracks", "2 clips with a track, 1 without"),
                       ("audio codecs", "aac (2 clips)"), ("channels", "2 (2 clips)"),
                       ("audio unread", "1 clip (`features report` lists why)")]:
        assert f"<td class='key'>{key}</td><td>{html.escape(value)}</td>" in numbers, key
    assert f"<h4>Audio not read</h4><p><code>damaged</code>: {html.escape(EGEMAPS_NOTE)}</p>" in numbers
    assert f"<p class='note'>audio: {html.escape(EGEMAPS_NOTE)}</p>" in clip_row(page, "damaged")
    with open_features(folder) as features:
        voiced = features.read(VOICED_ID, arrays=("timestamps", "has_audio"))
        damaged = features.read("damaged", arrays=("has_audio",))["has_audio"]
    strip = audio_strip(clip_row(page, VOICED_ID))
    # Loudness, eGeMAPS' first descriptor, in the bottom rows (25 values over 64 pixels: two and a half each).
    loudness = strip[-2:]
    assert_the_burst_is_brightest_and_the_unheard_grey(loudness, voiced["timestamps"], voiced["has_audio"], 0.2)
    columns = frame_columns(audio_strip(clip_row(page, "damaged")), len(damaged))
    assert (columns[~damaged] == NO_AUDIO_COLOUR).all() and (~damaged).sum() == 3 + 4, "before the track, after 2.1 s"
    assert "· no audio track</p>" in clip_row(page, "mute")


def test_a_set_that_hears_no_frame_says_so(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    with ShardWriter(folder / shard_name(0), hearing_attrs("logmel")) as writer:
        for clip_id in ("a", "b"):
            clip = clip_of(clip_id, "sad", np.ones(4, bool), np.ones((4, 128), np.float32), np.ones((4, 64), np.float32))
            writer.add_clip(dataclasses.replace(clip, audio=np.zeros((4, 128), np.float32),
                                                has_audio=np.zeros(4, bool), audio_track=AudioTrack(note=NO_TRACK)))
    write_index(folder)
    page = build_report([folder], tmp_path / "report").read_text(encoding="utf-8")
    assert "<p class='alert'>No frame of this set has audio" in page
    assert "<td class='key'>audio tracks</td><td>0 clips with a track, 2 without</td>" in page
    assert "<td class='key'>audio codecs</td><td>none</td>" in page
    rows = page.count("<div class='clip'>")
    assert rows >= 2 and page.count("· no audio track</p>") == rows and page.count("alt='audio'") == rows


def test_the_planted_clips_are_among_the_clips_worth_a_look(report):
    _, page = report
    worth = section(page, "Clips worth a look", "A random sample")
    rows = {html.unescape(match[0]): match[1] for match in
            re.findall(r"<h3>(.*?)</h3><p class='facts'>.*?</p><p class='rule'>why: (.*?)</p>", worth)}
    assert "no face" in rows[FACELESS_ID].split(", ")
    assert "main face jumps" in rows[JUMPING_ID].split(", ")
    assert "face in 0 of 4 frames" in worth and "1 jumps" in worth


def test_the_page_refers_to_nothing_outside_itself_and_shows_ids_as_text(report, extraction):
    out, page = report
    assert "http" not in page and "<script" not in page and "url(" not in page
    sources = re.findall(r"src\s*=\s*['\"]?([^'\" >]*)", page, flags=re.IGNORECASE)
    assert sources and all(source.startswith("data:") for source in sources)
    assert html.escape(JUMPING_ID) in page
    assert not (extraction.parents[2] / "escape").exists()


def test_with_the_videos_moved_away_the_page_still_builds_and_says_so_per_row(extraction, tmp_path):
    videos = extraction.parents[1] / "videos"
    moved = videos.rename(videos.with_name("moved"))
    try:
        page = build_report([extraction], tmp_path / "report", videos=videos).read_text(encoding="utf-8")
    finally:
        moved.rename(videos)
    rows = page.count("<div class='clip'>")
    assert rows >= 4 and page.count("video not found at") == rows
    assert page.count("this set stores no face crops") == rows
    assert "alt='frame'" not in page and page.count("alt='frames with a face'") == rows


def test_stored_crops_stand_in_for_unreachable_videos(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    crops = np.full((3, 128, 128, 3), 200, np.uint8)
    clip = clip_of("far away", "happy", np.array([True, False, True]), np.ones((3, 128), np.float32),
                   np.ones((3, 64), np.float32))
    crops[1] = 0  # the writer's filler for a frame without a face
    with ShardWriter(folder / shard_name(0), extractor_attrs(), store_face_crops=True) as writer:
        writer.add_clip(dataclasses.replace(clip, face_crop=crops))
    write_index(folder)
    page = build_report([folder], tmp_path / "report", videos=tmp_path).read_text(encoding="utf-8")
    rows = page.count("<div class='clip'>")
    assert rows and page.count("alt='face crop'") == 2 * rows, "the two frames with a face, in each row"
    assert "no face crops" not in page and page.count("is not absolute") == rows


def test_a_crafted_shards_boxes_and_scores_are_shown_as_data_never_followed(extraction, tmp_path):
    """Boxes far outside the frame (where no detector's box lies), not numbers, or
    inverted; scores that are not numbers: the page says so and shows the rest."""
    video = extraction.parents[1] / "videos" / "0.mp4"  # the clip "face": 4 frames at 5 fps
    clip = clip_of("crafted", "happy", np.ones(4, bool), np.ones((4, 128), np.float32), np.ones((4, 64), np.float32))
    box = np.float32([[1e30, 0, 3e38, 10], [np.nan, 0, 10, 10], [-1e7, -1e7, 1e7, 1e7], [60, 60, 10, 10]])
    folder = tmp_path / "train"
    folder.mkdir()
    with ShardWriter(folder / shard_name(0), extractor_attrs()) as writer:
        writer.add_clip(dataclasses.replace(clip, source_path=str(video)))
    write_index(folder)
    with h5py.File(folder / shard_name(0), "r+") as shard:  # values the writer refuses, as a crafted file has them
        shard["frames/box"][...] = box
        shard["frames/score"][...] = np.float32([np.nan, 1, np.inf, 0.5])
    page = build_report([folder], tmp_path / "report", sample_size=0, videos=video.parent).read_text(encoding="utf-8")
    assert page.count("alt='frame'") == 4 and "3 stored boxes are not numbers or lie far outside" in page
    assert page.count("alt='face crop'") == 1, "the inverted box's crop: black, as the extractor's would be"


def test_only_videos_below_the_folder_the_user_names_are_read(extraction, tmp_path):
    """A shard names its videos itself: one naming a private file of this machine, directly or through a
    link inside --videos, must not bring its frames into a page that may be sent on."""
    private = tmp_path / "private"
    private.mkdir()
    secret = private / "secret.mp4"
    secret.write_bytes((extraction.parents[1] / "videos" / "0.mp4").read_bytes())
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "inside.mp4").symlink_to(secret)
    folder = tmp_path / "train"
    folder.mkdir()
    with ShardWriter(folder / shard_name(0), extractor_attrs()) as writer:
        for clip_id, source in (("direct", secret), ("through a link", videos / "inside.mp4")):
            clip = clip_of(clip_id, "happy", np.ones(4, bool), np.ones((4, 128), np.float32), np.ones((4, 64), np.float32))
            writer.add_clip(dataclasses.replace(clip, source_path=str(source)))
    write_index(folder)
    page = build_report([folder], tmp_path / "report", videos=videos).read_text(encoding="utf-8")
    rows = page.count("<div class='clip'>")
    assert rows >= 2 and page.count(f"is outside --videos {videos}: not read") == rows
    assert "alt='frame'" not in page
    page = build_report([extraction], tmp_path / "again").read_text(encoding="utf-8")  # no --videos: none read
    rows = page.count("<div class='clip'>")
    assert rows >= 4 and page.count("videos not read (name their folder with --videos") == rows
    assert "alt='frame'" not in page


def test_the_frames_shown_include_the_first_without_a_face_and_both_sides_of_a_jump():
    has_face = np.ones(15, bool)
    has_face[7] = False
    boxes = np.tile(np.float32([0, 0, 10, 10]), (15, 1))
    boxes[7] = np.nan
    boxes[11:] += 100
    assert shown_frames(has_face, boxes, 8) == [0, 2, 4, 7, 8, 10, 11, 14]
    assert shown_frames(has_face[:3], boxes[:3], 8) == [0, 1, 2]


def planted_set(folder: Path, clip_ids: list[str], has_face: bool) -> Path:
    folder.mkdir(parents=True)
    with ShardWriter(folder / shard_name(0), extractor_attrs()) as writer:
        for clip_id in clip_ids:
            writer.add_clip(clip_of(clip_id, "sad", np.full(4, has_face), np.ones((4, 128), np.float32),
                                    np.ones((4, 64), np.float32)))
    write_index(folder)
    return folder


def test_a_set_without_any_face_gives_a_page_that_says_so_beside_one_with_faces(tmp_path):
    sets = [planted_set(tmp_path / "train", ["a", "b"], has_face=False), planted_set(tmp_path / "val", ["c"], True)]
    out = tmp_path / "report"
    page = build_report(sets, out, sample_size=0).read_text(encoding="utf-8")
    assert page.count("No frame of this set has a face") == 1 and "<h3>train</h3>" in page and "<h3>val</h3>" in page
    assert "<b>no face</b>: no frame with a face (2 of 3 clips)" in page
    # Sets made without audio: nothing of it but their recipes' attributes (audio_features none...).
    shown = re.sub(r"<details>.*?</details>", "", page)
    assert "audio_features</td><td>none</td>" in page
    assert not re.search(r"audio|sample rates|channels", shown, flags=re.IGNORECASE)
    with Image.open(out / "face-rate.png") as overview:
        assert overview.width == 2 * PANEL_WIDTH * DPI, "the two sets side by side"


def test_bad_inputs_are_one_line_and_write_nothing(extraction, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "table.h5").write_bytes(b"not HDF5 at all")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for inputs, out, words in [
        ([tmp_path / "empty"], tmp_path / "out", ("empty", "no complete feature shards")),
        ([tmp_path / "other"], tmp_path / "out", ("table.h5",)),
        ([extraction, extraction], tmp_path / "out", ("given twice",)),
        ([extraction], tmp_path / "taken", ("notes.txt", "--overwrite")),
        ([extraction], extraction / "report", ("inside the feature set",)),
    ]:
        one_line_error(*run_cli("features", "report", *inputs, "--out", out)[::2], *words)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "other", "taken"]
    assert [path.name for path in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert not (extraction / "report").exists()
