"""Run folders, ensembles, output folders and names crafted by a careless colleague or an attacker.

Each test builds its crafted files itself. Commands run in-process through click (a refusal
is immediate, and a subprocess would cost seconds each); what is checked is what a user of
the command line sees: the exit status, one line on stderr, and files left exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from manifests.manifest import ClipEntry, ManifestError, read_manifest, write_manifest
from manifests.spreadsheet import neutralised, restored
from outputs import check_plain_name, OutputError, output_paths, write_atomically
from train.config import TrainConfig
from train.loop import train_model
from tests.cli_runs import one_line_error, run_cli
from tests.feature_files import write_planted_set
from tests.conftest import QUIET, quiet

TINY = dict(epochs=1, lr=1e-3, batch_size=16, context_dim=16)
USAGE = 2


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (links as the text of where they point)."""
    return {
        str(path.relative_to(folder)): os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("features"), "both", {"train": 24, "val": 12},
                             context_dim=TINY["context_dim"])


def trained(features: Path, out: Path, model: str = "caca") -> Path:
    config = TrainConfig(model=model, features=features, out=out, epochs=TINY["epochs"], lr=TINY["lr"],
                         batch_size=TINY["batch_size"])
    train_model(config, **QUIET)
    return out


@pytest.fixture(scope="module")
def runs(features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return {model: trained(features, folder / model, model) for model in ("caca", "face")}


class RunsCode:
    """Unpickling this calls open(marker, "w"): the marker appears only if loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def booby_trapped_copy(run: Path, folder: Path, marker: Path) -> Path:
    copy = shutil.copytree(run, folder)
    checkpoint = torch.load(copy / "best.pt", weights_only=True)
    checkpoint["config"]["trap"] = RunsCode(marker)
    torch.save(checkpoint, copy / "best.pt")
    return copy


def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(runs, features, tmp_path):
    marker = tmp_path / "pwned"
    trap = booby_trapped_copy(runs["caca"], tmp_path / "trap", marker)
    for args in (
        ("evaluate", "--run", trap, "--split", "val", "--device", "cpu"),
        ("predict", "--run", trap, "--device", "cpu", "--out", tmp_path / "p.csv", tmp_path / "none.mp4"),
        ("ensemble", "--runs", runs["face"], trap, "--out", tmp_path / "ensemble", "--device", "cpu"),
    ):
        status, _, stderr = run_cli(*args)
        one_line_error(status, stderr, str(trap / "best.pt"), "could run as code")
    assert not marker.exists()
    torch.load(trap / "best.pt", weights_only=False)  # what loading it the old way did
    assert marker.exists(), "the trap is live"


def test_an_ensemble_holding_a_booby_trapped_member_is_refused(runs, tmp_path):
    marker = tmp_path / "pwned"
    trap = booby_trapped_copy(runs["caca"], tmp_path / "trap", marker)
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps(
        {"members": [os.path.relpath(trap, ensemble), os.path.relpath(runs["face"], ensemble)], "weights": [0.5, 0.5],
         "classes": torch.load(runs["face"] / "best.pt", weights_only=True)["classes"]}))
    status, _, stderr = run_cli("evaluate", "--run", ensemble, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, "could run as code")
    assert not marker.exists()


def rewritten_checkpoint(run: Path, folder: Path, change) -> Path:
    copy = shutil.copytree(run, folder)
    checkpoint = torch.load(copy / "best.pt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, copy / "best.pt")
    return copy


@pytest.mark.parametrize("change, words", [
    (lambda c: c["attrs"].update(context_dim=10**10), ["context_dim 10000000000 is not an int from 1 to 262144"]),
    (lambda c: c["attrs"].update(context_dim=32), ["do not fit a caca model with context_dim 32"]),
    (lambda c: c["model"].popitem(), ["do not fit"]),
    (lambda c: c["config"].update(model="gpt"), ["model 'gpt' is not one of face"]),
    (lambda c: c.update(classes="happy"), ["classes"]),
    (lambda c: c.pop("attrs"), ["not a training checkpoint"]),
])
def test_a_checkpoint_whose_metadata_lies_is_refused_before_building_anything(runs, tmp_path, change, words):
    run = rewritten_checkpoint(runs["caca"], tmp_path / "run", change)
    status, _, stderr = run_cli("evaluate", "--run", run, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, str(run / "best.pt"), *words)


def test_a_damaged_checkpoint_is_one_line(runs, tmp_path):
    run = shutil.copytree(runs["caca"], tmp_path / "run")
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:1000])
    status, _, stderr = run_cli("evaluate", "--run", run, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, str(run / "best.pt"))


def ensemble_with(folder: Path, **spec) -> Path:
    folder.mkdir(parents=True)
    (folder / "ensemble.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("members, words", [
    ([".", "."], ["is the ensemble itself"]),
    (["/etc", "."], ["not a path relative"]),
    (["../elsewhere", "."], ["is not a folder"]),
    (["../other", "."], ["is an ensemble"]),
])
def test_ensemble_members_that_escape_or_loop_are_refused(runs, tmp_path, members, words):
    classes = torch.load(runs["caca"] / "best.pt", weights_only=True)["classes"]
    ensemble_with(tmp_path / "other", members=["../ensemble", "../ensemble"], weights=[0.5, 0.5], classes=classes)
    ensemble = ensemble_with(tmp_path / "ensemble", members=members, weights=[0.5, 0.5], classes=classes)
    status, _, stderr = run_cli("evaluate", "--run", ensemble, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, *words)


@pytest.mark.parametrize("spec, words", [
    ("{not json", ["not an ensemble file"]),
    ({"members": ["../a"], "weights": [1.0], "classes": []}, ["two or more"]),
    ({"members": ["../a", "../b"], "weights": [0.9, 0.9], "classes": []}, ["summing to 1"]),
    ({"members": ["../a", "../b"], "weights": ["x", 1], "classes": []}, ["summing to 1"]),
])
def test_a_malformed_ensemble_file_is_one_line(tmp_path, spec, words):
    folder = tmp_path / "ensemble"
    folder.mkdir()
    (folder / "ensemble.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    status, _, stderr = run_cli("evaluate", "--run", folder, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, *words)


def test_the_ensemble_command_refuses_an_ensemble_or_its_own_folder_as_a_member(runs, tmp_path):
    status, _, stderr = run_cli("ensemble", "--runs", runs["caca"], runs["face"], "--out", runs["face"], "--overwrite")
    one_line_error(status, stderr, "one of the members")
    nested = ensemble_with(tmp_path / "nested", members=["a", "b"], weights=[0.5, 0.5], classes=[])
    status, _, stderr = run_cli("ensemble", "--runs", runs["caca"], nested, "--out", tmp_path / "e")
    one_line_error(status, stderr, "is an ensemble")


def test_train_refuses_a_users_folder_and_leaves_it_byte_identical(features, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"my own model")
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "epochs.csv").write_text("my,log\n")
    before = snapshot(folder)
    status, _, stderr = run_cli("train", "--model", "face", "--features", features, "--out", folder, "--epochs", 1)
    one_line_error(status, stderr, str(folder), "--overwrite")
    (folder / "notes.txt").write_text("not a run's file")
    before = snapshot(folder)
    status, _, stderr = run_cli("train", "--model", "face", "--features", features, "--out", folder, "--epochs", 1)
    one_line_error(status, stderr, "'notes.txt'", "--overwrite")
    assert snapshot(folder) == before


def test_train_restarts_only_its_own_unfinished_run_of_the_same_settings(features, runs, tmp_path):
    finished = shutil.copytree(runs["face"], tmp_path / "finished")
    before = snapshot(finished)
    args = ("train", "--model", "face", "--features", features, "--out", finished, "--epochs", 1, "--batch-size", 16)
    status, _, stderr = run_cli(*args, "--lr", 1e-3)
    one_line_error(status, stderr, "already holds a finished run", "--overwrite")
    assert snapshot(finished) == before
    (finished / "metrics.json").unlink()  # now an interrupted run of these settings: it starts over
    status, _, stderr = run_cli(*args, "--lr", 1e-3)
    assert status == 0, stderr
    (finished / "metrics.json").unlink()
    status, _, stderr = run_cli(*args, "--lr", 1e-2)
    one_line_error(status, stderr, "unfinished run of other settings", "there != here: lr: 0.001 != 0.01", "--overwrite")
    status, _, stderr = run_cli(*args, "--lr", 1e-2, "--overwrite")
    assert status == 0, stderr
    assert json.loads((finished / "config.json").read_text())["lr"] == 1e-2


def test_compare_refuses_to_reuse_a_run_of_other_settings(features, runs, tmp_path):
    shutil.copytree(runs["face"], tmp_path / "face-seed0")
    args = ("compare", "--models", "face", "--seeds", 1, "--features", features, "--out", tmp_path, "--lr", 1e-3,
            "--batch-size", 16)
    status, stdout, stderr = run_cli(*args, "--epochs", 1)
    assert status == 0, stderr
    assert "1 of 1 runs already finished; training 0" in stdout
    status, _, stderr = run_cli(*args, "--epochs", 2)
    one_line_error(status, stderr, "face-seed0 is a finished run of other settings", "there != here: epochs: 1 != 2")
    (tmp_path / "my-notes.txt").write_text("mine")
    status, _, stderr = run_cli(*args, "--epochs", 1)
    one_line_error(status, stderr, "'my-notes.txt'", "--overwrite")


def test_evaluate_writes_no_result_through_a_link_in_the_run_folder(runs, tmp_path):
    run = shutil.copytree(runs["caca"], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metrics.json").write_text("precious")
    (run / "eval-val").symlink_to(elsewhere)
    status, _, stderr = run_cli("evaluate", "--run", run, "--split", "val", "--device", "cpu")
    one_line_error(status, stderr, "eval-val")
    assert snapshot(elsewhere) == {"metrics.json": b"precious"}


def test_predict_never_writes_its_predictions_over_an_input_or_a_users_file(runs, tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("clip_id,path,label,split\na,a.mp4,,test\n")
    (tmp_path / "a.mp4").write_bytes(b"not really a video")
    before = manifest.read_bytes()
    status, _, stderr = run_cli("predict", "--run", runs["caca"], "--out", manifest, manifest)
    one_line_error(status, stderr, "is one of the inputs")
    status, _, stderr = run_cli("predict", "--run", runs["caca"], "--out", tmp_path / "a.mp4", manifest)
    one_line_error(status, stderr, "is one of the inputs")
    mine = tmp_path / "mine.csv"
    mine.write_text("my,table\n")
    status, _, stderr = run_cli("predict", "--run", runs["caca"], "--out", mine, manifest)
    one_line_error(status, stderr, str(mine), "--overwrite")
    assert manifest.read_bytes() == before and mine.read_text() == "my,table\n"


def test_predict_pictures_go_only_to_a_new_or_its_own_folder(runs, tmp_path):
    pictures = tmp_path / "Pictures"
    pictures.mkdir()
    (pictures / "holiday.png").write_bytes(b"a photo")
    (tmp_path / "a.mp4").write_bytes(b"x")
    status, _, stderr = run_cli("predict", "--run", runs["caca"], "--explain", pictures, "--out", tmp_path / "p.csv",
                                tmp_path / "a.mp4")
    one_line_error(status, stderr, str(pictures), "--overwrite")
    assert snapshot(pictures) == {"holiday.png": b"a photo"}


def test_demo_refuses_a_folder_or_clips_it_did_not_make(tmp_path):
    from demo.run import run_demo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="thesis.tex.*--overwrite"):
        run_demo(tmp_path / "mine", log=quiet)
    clips = tmp_path / "demo" / "clips" / "train" / "happy"
    clips.mkdir(parents=True)
    (clips / "my-recording.mp4").write_bytes(b"irreplaceable")
    before = snapshot(tmp_path)
    status, _, stderr = run_cli("demo", "--out", tmp_path / "demo")
    one_line_error(status, stderr, "was not made by the demo", "--overwrite")
    assert snapshot(tmp_path) == before


def test_manifest_builders_refuse_to_replace_another_manifest(tmp_path):
    root = tmp_path / "data" / "train" / "happy"
    root.mkdir(parents=True)
    (root / "a.mp4").write_bytes(b"x")
    out = tmp_path / "manifest.csv"
    out.write_text("clip_id,path,label,split\nmine,/elsewhere.mp4,sad,train\n")
    before = out.read_bytes()
    status, _, stderr = run_cli("manifest", "folder", "--root", tmp_path / "data", "--out", out)
    one_line_error(status, stderr, str(out), "--overwrite")
    assert out.read_bytes() == before
    assert run_cli("manifest", "folder", "--root", tmp_path / "data", "--out", out, "--overwrite")[0] == 0
    assert run_cli("manifest", "folder", "--root", tmp_path / "data", "--out", out)[0] == 0, "same content again"
    assert [e.clip_id for e in read_manifest(out)] == ["train/happy/a"]


@pytest.mark.parametrize("split", ["../../x", "/abs/x", "a/b", ".", "..", ".hidden", "tab\there", "nul\x00", ""])
def test_split_names_are_plain_names(tmp_path, split):
    out = tmp_path / "out"
    for args in (("extract", "--split", split, "--out", out), ("train", "--model", "face", "--train-split", split),
                 ("evaluate", "--run", tmp_path, "--split", split)):
        status, _, stderr = run_cli(*args)
        assert status == USAGE and "is not a plain name" in stderr, stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="not a plain name"):
        check_plain_name(split, "split")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"clip_id": ["a"], "path": ["a.mp4"], "label": ["happy"], "split": [split]}).to_csv(manifest, index=False)
    with pytest.raises(ManifestError, match="cannot name a folder" if split.strip() else "empty split"):
        read_manifest(manifest, check_files=False)


def test_picture_paths_never_leave_the_folder_and_never_collide():
    ids = ["../../x", "/abs/x", "a/../../b", "x\x00y", "new\nline", "A", "a", "a/b", "a.png/c", "a.png", ".", "..",
           "%2E%2E", "c\\d", "w" * 400, "w" * 401, "//", "", "ok/nested/clip"]
    paths = output_paths(ids, ".png")
    root = Path("/out")
    files = [root / path for path in paths.values()]
    assert all(os.path.normpath(f).startswith("/out/") and ".." not in f.parts for f in files)
    assert all("\x00" not in str(f) and "\n" not in str(f) and len(part.encode()) < 256
               for f in files for part in f.parts)
    keys = [str(path).casefold() for path in paths.values()]
    folders = {str(parent).casefold() for path in paths.values() for parent in path.parents}
    assert len(set(keys)) == len(ids) and not folders & set(keys)
    assert paths["ok/nested/clip"] == Path("ok/nested/clip.png") and paths["a/b"] == Path("a/b.png")


def test_spreadsheet_formulas_are_neutralised_and_come_back(tmp_path):
    values = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-abc", "@SUM(A1)", "'=quoted", "'plain", "plain", "\tx"]
    assert [restored(neutralised(v)) for v in values] == values
    assert all(not neutralised(v).startswith(("=", "+", "-", "@", "\t")) for v in values)
    entries = [ClipEntry(value or "x", tmp_path / f"{i}.mp4", None, "test") for i, value in enumerate(values)]
    write_manifest(entries, tmp_path / "m.csv")
    cells = pd.read_csv(tmp_path / "m.csv", dtype=str)["clip_id"]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert [e.clip_id for e in read_manifest(tmp_path / "m.csv", check_files=False)] == values


def test_evaluate_predictions_are_safe_in_a_spreadsheet(features, tmp_path):
    from features.reader import write_index
    from features.writer import ShardWriter
    from tests.feature_files import extractor_attrs, planted_clip

    rng = np.random.default_rng(0)
    folder = tmp_path / "odd" / "val"
    folder.mkdir(parents=True)
    with ShardWriter(folder / "shard-00000.h5", extractor_attrs(split="val", context_dim=TINY["context_dim"])) as w:
        for i, clip_id in enumerate(["=cmd|' /C calc'!A0", "@x", "fine"]):
            w.add_clip(planted_clip(clip_id, i % 2, np.zeros(128), np.zeros(TINY["context_dim"]), rng,
                                    TINY["context_dim"]))
    write_index(folder)
    run = trained(features, tmp_path / "run", "face")
    status, _, stderr = run_cli("evaluate", "--run", run, "--split", "val", "--features", tmp_path / "odd")
    assert status == 0, stderr
    cells = pd.read_csv(run / "eval-val" / "predictions.csv", dtype=str)["clip_id"]
    assert list(cells) == ["'=cmd|' /C calc'!A0", "'@x", "fine"]


def test_a_write_replaces_a_link_at_its_target_instead_of_following_it(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (tmp_path / "out.csv").symlink_to(precious)
    write_atomically(tmp_path / "out.csv", lambda tmp: tmp.write_text("new"))
    assert precious.read_text() == "keep" and not (tmp_path / "out.csv").is_symlink()
    assert (tmp_path / "out.csv").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "precious.txt"]
