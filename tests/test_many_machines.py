"""Stage 1 on many machines: static parts merged, and a Dask cluster, each equal to one machine's run.

Real clips and weights; the parts and the Dask driver run the CLI in subprocesses, the
Dask cluster is a real local one. The reference run, merges and resumes run in this
process (the same calls the CLI makes), to keep the module under about a minute on 2 cores.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import distributed  # a missing package fails this module; it never skips it
import pytest
from click.testing import CliRunner

import cli as cli_module
from extract.parts import balanced_parts, clip_durations
from extract.pipeline import extract_split
from extract.settings import ExtractError, ExtractSettings, check_options
from features.reader import open_features
from features.tools import inspect, merge, recorded_failures, validate
from manifests.builders import build_folder
from manifests.manifest import ClipEntry, read_manifest, write_manifest
from tests.conftest import QUIET
from tests.feature_files import assert_same_clips, read_all
from tests.media import moving_face, photo, write_clip
from tests.threads import FRESH_PROCESS_THREADS, torch_threads

ROOT = Path(__file__).resolve().parents[1]
# Clearly different durations (frames at 25 fps), so a count-balanced split would be unbalanced;
# and two equal ones (with the 5-frame cat clip), so ties are broken by clip id.
CLIPS = {
    "train/happy/long.mp4": ("coffee", 25),
    "train/happy/mid.mp4": ("rocket", 15),
    "train/sad/short.mp4": ("coffee", 10),
    "train/sad/shorter.mp4": ("rocket", 5),
}
BROKEN = "train/angry/notes"


def extract_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--manifest", str(dataset / "m.csv"), "--split", "train", "--out", str(out),
            "--context-backbone", "mobilenet_v2", "--device", "cpu", "--shard-size", "1", "--quiet", *extra]


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "cli.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def settings(dataset: Path, out: Path, **options) -> ExtractSettings:
    """The settings `extract_args` give, for runs in this process."""
    return ExtractSettings(split="train", manifest=dataset / "m.csv", out=out, context_backbone="mobilenet_v2",
                           device="cpu", shard_size=1, **options)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, extraction_weights):
    root = tmp_path_factory.mktemp("many")
    for rel, (scene, frames) in CLIPS.items():
        (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / "data" / rel, moving_face(scene, frames))
    (root / "data/train/neutral").mkdir(parents=True)
    write_clip(root / "data/train/neutral/cat.mp4", [photo("chelsea")] * 5)
    (root / "data/train/angry").mkdir(parents=True)
    (root / "data/train/angry/notes.mp4").write_text("not a video")
    write_manifest(build_folder(root / "data"), root / "m.csv")
    return root


@pytest.fixture(scope="module")
def single(dataset):
    """The reference: the whole split on one machine, one process, on a CLI process's torch threads."""
    with torch_threads(FRESH_PROCESS_THREADS):
        summary = extract_split(settings(dataset, dataset / "single"), **QUIET)
    assert (summary.done, len(summary.failures)) == (5, 1)
    return dataset / "single" / "train"


def failed_ids(folder: Path) -> set[str]:
    with open(folder / "failures.csv", newline="") as f:
        return {row["clip_id"] for row in csv.DictReader(f)}


# When and where a shard was made, not how: the only attributes in which a part's shards, or a
# Dask task's, differ from a one-process run's (the content hash covers them).
PROVENANCE = ("created", "part", "content_sha256")


def assert_same_features(result: Path, reference: Path) -> None:
    """The same clips and arrays bit for bit (`assert_same_clips`), and the same settings."""
    assert_same_clips(read_all(result), read_all(reference))
    assert made_with(result) == made_with(reference)


def made_with(folder: Path) -> list[dict]:
    """Each distinct set of shard attributes in `folder`, provenance left out."""
    with open_features(folder) as features:
        settings = [{k: v for k, v in shard.attrs.items() if k not in PROVENANCE} for shard in features.shards]
    return [attrs for i, attrs in enumerate(settings) if attrs not in settings[:i]]


def test_parts_are_balanced_by_duration_not_count():
    parts = balanced_parts({f"c{i:02d}": d for i, d in enumerate([10] + [1] * 10)}, 2)
    assert parts == [["c00"], [f"c{i:02d}" for i in range(1, 11)]]


def test_every_clip_lands_in_exactly_one_part_the_same_on_every_machine():
    rng = random.Random(0)
    durations = {f"clip{i:03d}": rng.choice([0.0, 1.5, 2.0, 2.0, 7.25, rng.uniform(0, 30)]) for i in range(200)}
    parts = balanced_parts(durations, 7)
    shuffled = dict(sorted(durations.items(), key=lambda item: rng.random()))
    assert balanced_parts(shuffled, 7) == parts, "the partition must not depend on the manifest's order"
    assert sorted(clip for part in parts for clip in part) == sorted(durations)
    loads = [sum(durations[clip] for clip in part) for part in parts]
    assert max(loads) - min(loads) <= max(durations.values())
    assert balanced_parts({"a": 1.0}, 3) == [["a"], [], []]


def test_durations_come_from_the_headers_and_unreadable_files_count_as_zero(dataset):
    entries = read_manifest(dataset / "m.csv", check_files=False)
    gone = ClipEntry(clip_id="gone", path=dataset / "gone.mp4", label=None, split="train")
    durations = clip_durations([*entries, gone], progress=False)
    assert durations == pytest.approx({"train/happy/long": 1.0, "train/happy/mid": 0.6, "train/sad/short": 0.4,
                                       "train/sad/shorter": 0.2, "train/neutral/cat": 0.2, BROKEN: 0.0, "gone": 0.0})


@pytest.mark.parametrize("options, message", [
    (dict(num_shards=3), "--num-shards and --shard-index go together"),
    (dict(shard_index=0), "--num-shards and --shard-index go together"),
    (dict(num_shards=3, shard_index=3), "--shard-index 3 is outside 0..2"),
    (dict(backend="slurm"), "--backend 'slurm' is not one of local, dask"),
    (dict(backend="dask"), "--backend dask needs --scheduler"),
    (dict(scheduler="tcp://h:8786"), "--scheduler is used only with --backend dask"),
    (dict(backend="dask", scheduler="tcp://h:8786", workers=2), "--workers is for the local backend"),
])
def test_option_errors(options, message):
    with pytest.raises(ExtractError, match=message):
        check_options(ExtractSettings(split="train", **options))


def test_three_parts_merged_equal_one_machine(dataset, single):
    out = dataset / "parts"
    runs = [start_cli(*extract_args(dataset, out, "--num-shards", "3", "--shard-index", str(i))) for i in range(3)]
    outcomes = [(run.wait(), run.stderr.read()) for run in runs]
    parts = [out / "train" / f"part-{i}-of-3" for i in range(3)]
    # The broken clip fails in exactly one part, like in the single run.
    assert sorted(status for status, _ in outcomes) == [0, 0, 3], outcomes
    assert [failed_ids(part) for part in parts if failed_ids(part)] == [{BROKEN}]
    # Seconds 1.0 | 0.6 + 0.2 | 0.4 + 0.2 + 0.0 (the broken clip): balanced by duration, not count;
    # of the two 0.2 s clips, cat comes first by id and goes to the then lightest part.
    assert [sorted(read_all(part)) for part in parts] == [
        ["train/happy/long"], ["train/happy/mid", "train/sad/shorter"], ["train/neutral/cat", "train/sad/short"]]
    with open_features(parts[1]) as features:
        assert {shard.attrs["part"] for shard in features.shards} == {"1/3"}

    merge(parts, out / "train")
    assert validate(out / "train") == []
    failures = next(part / "failures.csv" for part in parts if failed_ids(part))
    assert recorded_failures(out / "train") == {failures: 1}
    assert f"failed clips  1 (1 in {failures})" in inspect(out / "train")
    # Each part is a fresh process on the reference's torch threads, its shards of one clip
    # batched as the reference's: the README's "bitwise equal".
    assert_same_features(out / "train", single)

    again = extract_split(settings(dataset, out, num_shards=3, shard_index=2), **QUIET)
    assert (again.done, again.skipped, again.earlier_failures) == (0, 2, 1)


def test_a_wrong_part_is_one_line_naming_the_option(dataset):
    done = CliRunner().invoke(cli_module.cli, extract_args(dataset, dataset / "wrong", "--num-shards", "3",
                                                           "--shard-index", "3"))
    assert done.exit_code == 1
    assert done.stderr.splitlines() == ["error: --shard-index 3 is outside 0..2 (--num-shards 3)"]


@pytest.fixture(scope="module")
def dask_scheduler():
    # Dask's nanny, here in the test process, sets its workers' variables in this process's
    # environment (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_...) and leaves them: every later
    # subprocess of the session would then run torch on one thread, and allocate slowly.
    environment = dict(os.environ)
    # One worker process with two threads: tasks also share one process's networks.
    try:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                      dashboard_address=None) as cluster:
            yield cluster.scheduler_address
    finally:
        os.environ.clear()
        os.environ.update(environment)


def test_dask_gives_one_machines_features_failures_and_resume(dataset, single, dask_scheduler):
    out = dataset / "dask"
    run = start_cli(*extract_args(dataset, out, "--backend", "dask", "--scheduler", dask_scheduler))
    stdout, stderr = run.communicate()
    assert run.returncode == 3, stderr
    assert "5 clips extracted, 0 already done, 1 failed" in stdout
    assert failed_ids(out / "train") == {BROKEN}
    assert validate(out / "train") == []
    # Each Dask task runs torch on one thread (the reference on two here differs by up to 0.0044
    # on face maps, 0.0010 on face features, one float16 step on context, 3e-5 px on boxes), so
    # the reference is one process on one thread.
    with torch_threads(1):
        assert extract_split(settings(dataset, dataset / "one-thread"), **QUIET).done == 5
    assert_same_features(out / "train", dataset / "one-thread" / "train")

    again = extract_split(settings(dataset, out, backend="dask", scheduler=dask_scheduler), **QUIET)
    assert (again.done, again.skipped, again.earlier_failures) == (0, 5, 1)


def test_dask_without_distributed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what import sees when it is not installed
    with pytest.raises(ExtractError, match=r"^--backend dask needs Dask's distributed package: pip install 'caca-rnn\[dask\]'$"):
        check_options(ExtractSettings(split="train", backend="dask", scheduler="tcp://127.0.0.1:8786"))


