"""Feature sets from other teams, crafted by a careless colleague or an attacker: verified, not believed.

Each test makes its crafted files itself, from a valid set written by the real writer, with
h5py or by editing index.json. Commands run in-process through click (a refusal is
immediate, a subprocess costs seconds); what is checked is what a user of the command line
sees: the exit status, one line on stderr naming the file, and files left as they were.
The fuzz test at the end runs its whole loop in one child process under a memory limit.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli import EXIT_ERROR
from features.reader import open_features, write_index
from features.schema import INDEX_NAME, FeatureFileError, content_sha256, shard_name
from features.writer import WRITER_LOCK_FILE, ShardWriter, only_writer
from features import look, writer
from features.tools import merge, validate
from tests.cli_runs import one_line_error, run_cli
from tests.feature_files import DAMAGED_CONTEXT_DIM as CONTEXT_DIM, extractor_attrs, planted_clip, write_planted_set

SHARD = f"train/{shard_name(0)}"


def problem_lines(stderr: str) -> list[str]:
    """What `features validate` says, without its progress bar."""
    return [line for line in stderr.splitlines() if line and "%|" not in line]


def train_args(root: Path, out: Path) -> tuple:
    return ("train", "--model", "concat", "--features", root, "--out", out, "--epochs", 1, "--batch-size", 8,
            "--device", "cpu")


def edit_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    change(index)
    (folder / INDEX_NAME).write_text(json.dumps(index))


def shard_truth(shard: Path) -> dict[str, list]:
    with h5py.File(shard, "r") as handle:
        return {"clip_id": handle["clips/clip_id"].asstr()[()].tolist(),
                "label": handle["clips/label"].asstr()[()].tolist(), "length": handle["clips/length"][()].tolist()}


def every_command_refuses(root: Path, tmp_path: Path, *words: str, named: str = SHARD) -> None:
    """validate lists the problem naming the file; inspect and train stop with one line naming it."""
    status, _, stderr = run_cli("features", "validate", root / "train")
    problems = problem_lines(stderr)
    assert status == EXIT_ERROR and problems, stderr
    assert all(line.startswith(str(root / "train")) for line in problems), stderr
    assert any(all(word in line for word in (str(root / named), *words)) for line in problems), stderr
    status, _, stderr = run_cli("features", "inspect", root / "train")
    one_line_error(status, stderr, str(root / named), *words)
    status, _, stderr = run_cli(*train_args(root, tmp_path / "run"))
    one_line_error(status, stderr, str(root / named), *words)


# --- an index is a cache: it never decides labels, lengths or ids ---------------------------


def test_train_learns_the_shards_labels_not_an_edited_indexs(root, tmp_path, caplog):
    def unlabel_everything(index):
        index["shards"][0]["clips"]["label"] = [""] * len(index["shards"][0]["clips"]["label"])

    edit_index(root / "train", unlabel_everything)  # believed, this is "no labels to learn from"
    with caplog.at_level(logging.WARNING, logger="features.reader"):
        status, _, stderr = run_cli(*train_args(root, tmp_path / "run"))
    assert status == 0, stderr
    assert "1 entries disagree with their shards (edited or stale)" in caplog.text
    with open_features(root / "train") as features:
        assert list(features.labels.values()) == shard_truth(root / SHARD)["label"]


@pytest.mark.parametrize("column", ["clip_id", "label", "length"])
def test_an_edited_index_entry_gives_way_to_the_shard_even_with_its_hash_recomputed(root, column):
    truth = shard_truth(root / SHARD)

    def lie(index):
        entry = index["shards"][0]
        clips = entry["clips"]
        if column == "length":  # still tiling the frames: the first clip takes a frame of the second
            clips["length"][0] += 1
            clips["length"][1] -= 1
            clips["start"][1] += 1
        else:
            clips[column] = [value + "-x" if value else "sad" for value in clips[column]]
        entry["attrs"]["content_sha256"] = content_sha256(entry["attrs"], clips)  # a careful liar

    edit_index(root / "train", lie)
    with open_features(root / "train") as features:
        table = features.shards[0].table
        assert {name: table[name] for name in truth} == truth
    write_index(root / "train")  # rewritten from the shards' truth
    assert validate(root / "train") == []


def test_an_index_whose_folders_leave_the_folder_is_refused_by_every_reader(root, tmp_path):
    for escaping in ("/etc", "a\0b"):
        edit_index(root / "train", lambda index: index.update(folders=[escaping]))
        every_command_refuses(root, tmp_path, "not a relative path", named=f"train/{INDEX_NAME}")
    with pytest.raises(FeatureFileError, match="not a relative path"):
        write_index(root / "train")


def test_an_index_nested_too_deep_is_ignored_as_unreadable(root):
    (root / "train" / INDEX_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with open_features(root / "train") as features:
        assert len(features) == 8
    assert validate(root / "train") == [f"{root / 'train' / INDEX_NAME}: missing or unreadable (readers rescan every"
                                        " shard); write it with write_index"]


# --- merge into a set never hides its shards ---------------------------------------------------


def one_shard_set(folder: Path, prefix: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with ShardWriter(folder / shard_name(0), extractor_attrs(context_dim=CONTEXT_DIM)) as shard:
        for i in range(3):
            shard.add_clip(planted_clip(f"{prefix}{i}", i, np.zeros(128), np.zeros(CONTEXT_DIM), rng, CONTEXT_DIM))
    write_index(folder)
    return folder


def test_merge_into_a_set_merges_all_of_both_and_again_changes_nothing(tmp_path):
    ours, theirs, more = (one_shard_set(tmp_path / name, name, seed) for seed, name in enumerate(("b", "a", "c")))
    merge([theirs], ours)
    with open_features(ours) as features:
        assert features.clip_ids == ["b0", "b1", "b2", "a0", "a1", "a2"]
    assert validate(ours) == []
    index = (ours / INDEX_NAME).read_bytes()
    merge([theirs], ours)
    assert (ours / INDEX_NAME).read_bytes() == index
    merge([more], ours)  # a set made by a merge keeps its folders too
    with open_features(ours) as features:
        assert features.clip_ids == ["b0", "b1", "b2", "a0", "a1", "a2", "c0", "c1", "c2"]
    assert validate(ours) == []


def test_validate_names_shards_an_index_leaves_out_and_readers_still_read_them(tmp_path):
    ours, theirs = one_shard_set(tmp_path / "b", "b", 0), one_shard_set(tmp_path / "a", "a", 1)
    part = one_shard_set(ours / "part-1-of-2", "p", 2)
    # What `merge A --out B` wrote before: B's index covers A only, hiding B's own shard.
    edit_index(ours, lambda index: index.update(folders=["../a"], shards=json.loads(
        (theirs / INDEX_NAME).read_text().replace(shard_name(0), f"../a/{shard_name(0)}"))["shards"]))
    problems = validate(ours)
    assert f"{ours / INDEX_NAME}: hides 1 shards in {ours} (its folders leave it out); add them with `python cli.py" \
           f" features merge {ours} --out {ours}`" in problems
    assert any(f"hides 1 shards in {part}" in problem for problem in problems)
    with open_features(ours) as features:
        assert features.clip_ids == ["b0", "b1", "b2", "a0", "a1", "a2"]
    merge([ours, part], ours)
    assert validate(ours) == []


# --- a shard is checked before anything is allocated from what it states --------------------


def rewrite(shard: Path, name: str, data) -> None:
    with h5py.File(shard, "r+") as handle:
        del handle[name]
        handle[name] = data


def resize_frames(shard: Path, frames: int) -> None:
    """Every per-frame dataset claims `frames` rows (nothing is written: the file stays small), and
    the clip table tiles them."""
    with h5py.File(shard, "r+") as handle:
        held = handle["frames/face"].shape[0]
        for dataset in handle["frames"].values():
            dataset.resize(frames, axis=0)
        lengths = handle["clips/length"][()]
        lengths[-1] += frames - held
        handle["clips/length"][...] = lengths


def set_attr(name: str, value):
    def craft(shard: Path) -> None:
        with h5py.File(shard, "r+") as handle:
            handle.attrs[name] = value
    return craft


CRAFTED = {
    "a 100 KB shard claiming 10^8 frames": (lambda shard: resize_frames(shard, 10**8),
                                            ["/frames/face claims (100000000, 128) values"]),
    "context_dim 1e10": (set_attr("context_dim", 1e10), ["context_dim 10000000000.0 is not an int"]),
    "context_dim 10^10 as an int": (set_attr("context_dim", 10**10), ["context_dim 10000000000 is not an int"]),
    "a label column longer than the others": (
        lambda shard: rewrite(shard, "clips/label", np.array(["happy"] * 9, dtype=h5py.string_dtype())),
        ["clip table columns have different lengths", "label 9"]),
    "integer clip ids": (lambda shard: rewrite(shard, "clips/clip_id", np.arange(8)),
                         ["/clips/clip_id is int64 (8,), expected variable-length string"]),
    "string starts": (lambda shard: rewrite(shard, "clips/start", np.array(["0"] * 8, dtype=h5py.string_dtype())),
                      ["/clips/start is object (8,), expected int64"]),
    "a scalar length": (lambda shard: rewrite(shard, "clips/length", np.int64(70)),
                        ["/clips/length is int64 (), expected int64 (clips,)"]),
    "variable-length string features": (
        lambda shard: rewrite(shard, "frames/face", np.array(["x"] * 8, dtype=h5py.string_dtype())),
        ["/frames/face is object (8,), expected float32"]),
    "an array attribute": (set_attr("fps", np.arange(1000.0)), ["attribute 'fps' is not a scalar"]),
    "classes that are not a list of names": (set_attr("classes", '{"a": 1}'), ["classes {'a': 1} is not a list"]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_shard_is_one_line_naming_it_for_every_command(root, tmp_path, case):
    craft, words = CRAFTED[case]
    craft(root / SHARD)
    assert (root / SHARD).stat().st_size < 200_000
    every_command_refuses(root, tmp_path, *words)


def test_a_shard_claiming_51_gb_is_one_line_from_the_real_command_under_a_1_gib_memory_limit(root):
    resize_frames(root / SHARD, 10**8)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "cli.py", "features", "inspect", str(root / "train")], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], preexec_fn=limit_memory)
    one_line_error(done.returncode, done.stderr, str(root / SHARD), "/frames/face claims (100000000, 128) values")


def test_a_dataset_stored_in_another_file_is_refused_before_reading(root, tmp_path):
    other = root / "val" / shard_name(0)
    with h5py.File(root / SHARD, "r+") as handle:
        del handle["frames/face"]
        handle["frames/face"] = h5py.ExternalLink(str(other), "/frames/face")
    every_command_refuses(root, tmp_path, "/frames/face is a link, not an object stored in this file")

    with h5py.File(other, "r") as source:
        frames = source["frames/face"].shape
    layout = h5py.VirtualLayout(shape=frames, dtype=np.float32, maxshape=(None, 128))
    layout[:] = h5py.VirtualSource(str(other), "frames/face", shape=frames)
    with h5py.File(root / SHARD, "r+") as handle:
        del handle["frames/face"]
        handle.create_virtual_dataset("frames/face", layout)
    every_command_refuses(root, tmp_path, "/frames/face takes its values from other files")

    raw = root / "train" / "face.raw"
    raw.write_bytes(b"\0" * 512 * 70)
    with h5py.File(root / SHARD, "r+") as handle:
        del handle["frames/face"]
        handle.create_dataset("frames/face", shape=(70, 128), dtype=np.float32, external=[(raw.name, 0, 512 * 70)])
    every_command_refuses(root, tmp_path, "/frames/face takes its values from other files")


def test_a_filter_hdf5_would_load_as_a_plugin_is_refused_before_reading(root, tmp_path):
    with h5py.File(root / SHARD, "r+") as handle:
        score = handle["frames/score"][()]
        del handle["frames/score"]
        handle.create_dataset("frames/score", data=score, chunks=(64,), maxshape=(None,), compression="lzf")
    data = bytearray((root / SHARD).read_bytes())
    name = data.find(b"lzf\0")  # the filter pipeline message: id (2 bytes), name length, flags, ..., name
    at = data.rfind((32000).to_bytes(2, "little"), 0, name)
    data[at : at + 2] = (32099).to_bytes(2, "little")  # a filter no HDF5 has built in
    (root / SHARD).write_bytes(data)
    with h5py.File(root / SHARD, "r") as handle, pytest.raises(OSError, match="plugin"):
        handle["frames/score"][()]  # what reading it would do: look for a plugin to load
    every_command_refuses(root, tmp_path, "/frames/score needs HDF5 filter 32099")


# --- writers never write through a planted link ------------------------------------------------


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_alone(root, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's file")
    out = tmp_path / "copy"
    out.mkdir()
    (out / WRITER_LOCK_FILE).symlink_to(precious)
    with pytest.raises(FeatureFileError, match=f"{out / WRITER_LOCK_FILE}: .* symbolic link"):
        with only_writer(out):
            pass
    status, _, stderr = run_cli("features", "repack", root / "train", "--out", out, "--compression", "none")
    one_line_error(status, stderr, str(out / WRITER_LOCK_FILE), "symbolic link")
    assert precious.read_text() == "a user's file" and (out / WRITER_LOCK_FILE).is_symlink()


def test_a_planted_temporary_shard_is_never_written_through(tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's file")
    monkeypatch.setattr(writer.secrets, "token_hex", lambda size: "cafe")
    planted = tmp_path / f".{shard_name(0)}.tmp-{os.getpid()}-cafe"
    planted.symlink_to(precious)
    with pytest.raises(FeatureFileError, match=f"{planted}: exists"):
        ShardWriter(tmp_path / shard_name(0), extractor_attrs(context_dim=CONTEXT_DIM))
    assert precious.read_text() == "a user's file" and planted.is_symlink()


def test_an_index_that_is_a_symlink_is_replaced_not_written_through(root, tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_text("a user's file")
    (root / "train" / INDEX_NAME).unlink()
    (root / "train" / INDEX_NAME).symlink_to(precious)
    write_index(root / "train")
    assert precious.read_text() == "a user's file" and not (root / "train" / INDEX_NAME).is_symlink()
    assert oct((root / "train" / INDEX_NAME).stat().st_mode & 0o777) == "0o644"


def test_an_in_place_edit_is_caught_by_validate_and_by_readers_without_a_vouching_index(root):
    with h5py.File(root / SHARD, "r+") as handle:
        handle["clips/label"][0] = "angry"
    problems = validate(root / "train")
    assert f"{root / SHARD}: content_sha256 does not match the attributes and clip table: the shard was changed" \
           " after it was written (re-extract it, or delete that attribute to accept the change)" in problems
    with open_features(root / "train") as features:  # the index holds the table as written, and is used
        assert features.labels[features.clip_ids[0]] != "angry"
    (root / "train" / INDEX_NAME).unlink()
    with pytest.raises(FeatureFileError, match="changed after it was written"):
        open_features(root / "train")


def test_a_shard_changed_after_this_process_checked_it_is_checked_again(root):
    with open_features(root / "train") as features:  # checked, and remembered by the identity of its file
        assert len(features) > 0
    with h5py.File(root / SHARD, "r+") as handle:
        del handle.attrs["fps"]
    with pytest.raises(FeatureFileError, match="attributes missing: fps"):
        open_features(root / "train")


# --- fuzz: random damage to a valid shard and its index ----------------------------------------

FUZZ_CASES = 300
FUZZ_SEED = 20261201
FUZZ_RUN_SECONDS = 20
FUZZ_SECONDS = 300  # the whole loop: about 15 s on an idle 2-core machine
FUZZ_LOOK_SECONDS = 0.5  # the look's limit (features/look.py) on these tiny shards
LOGGED = "WARNING "  # lines a run may log before its result or error
LOG_FORMAT = f"{LOGGED}%(name)s: %(message)s"
# Once every library is loaded and warmed up, the child's address space may grow by this many
# times the damaged shard's size (what readers may allocate from a file), plus a fixed
# allowance for a training run (measured: 300 cases grew it by 16 MiB at most).
FUZZ_BUDGET_PER_SHARD_BYTE = 64
FUZZ_TRAINING_ALLOWANCE = 64 << 20
# The look's helper is held to the same budget; its refusal for memory counts as a failed allocation.
FAILED_ALLOCATION = (*look.ALLOCATION_FAILED, "MemoryError", "MiB of memory")


def test_random_damage_to_a_shard_or_its_index_ends_in_one_line_in_bounded_time_and_memory(tmp_path):
    """Every command ends with 0, 1 or 3; an error is one line (validate: lines naming files),
    no run outlasts its alarm, and nothing fails to allocate under the child's memory limit."""
    child = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_hostile_features import fuzz_child;"
             " fuzz_child(sys.argv[2], *map(int, sys.argv[3:]))")
    command = [sys.executable, "-c", child, str(Path(__file__).resolve().parents[1]), str(tmp_path),
               *map(str, (FUZZ_CASES, FUZZ_SEED, FUZZ_BUDGET_PER_SHARD_BYTE, FUZZ_TRAINING_ALLOWANCE))]
    # One arena per thread would reserve 64 MiB of address space each, which the limit counts.
    environment = dict(os.environ, MALLOC_ARENA_MAX="2")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS, env=environment)
    except subprocess.TimeoutExpired as stuck:  # hung inside HDF5, where no Python alarm can interrupt it
        last = (stuck.stdout or b"").decode().splitlines()[-1:]
        pytest.fail(f"the fuzz loop hung after {last}")
    assert done.returncode == 0, done.stderr[-4000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if '"command"' in line]
    assert len(runs) == 3 * FUZZ_CASES
    wrong = [run for run in runs if not ends_well(run, tmp_path)]
    assert not wrong, json.dumps(wrong[:5], indent=1)
    assert {run["status"] for run in runs} == {0, 1}  # the damage reaches both outcomes
    assert any("did not finish parsing" in line for run in runs for line in run["stderr"])  # and HDF5's loop


def ends_well(run: dict, work: Path) -> bool:
    lines = [line for line in run["stderr"] if not line.startswith(LOGGED)]
    if run["status"] not in (0, 1, 3) or any(word in line for line in lines for word in FAILED_ALLOCATION):
        return False
    if run["status"] == 0:
        return True
    if run["command"] == "validate":
        return bool(lines) and all(line.startswith(str(work)) for line in lines)
    return len(lines) == 1 and lines[0].startswith("error: ")


class RunTimedOut(BaseException):
    """Raised by the alarm: a BaseException, so no handler of the command mistakes it for its own."""


def fuzz_mutation(rng, train: Path) -> str:
    """Damage train/'s shard or index in one random way; returns what was done."""
    shard, index = train / shard_name(0), train / INDEX_NAME
    kind = rng.choice(["truncate", "flip", "flip-metadata", "heap", "attribute", "dataset", "index"])
    if kind == "truncate":
        size = rng.randrange(shard.stat().st_size)
        os.truncate(shard, size)
        return f"truncate to {size}"
    if kind in ("flip", "flip-metadata"):
        data = bytearray(shard.read_bytes())
        # HDF5 keeps its superblock, object headers and attributes near the start, the clip table near the end.
        spans = [(0, len(data))] if kind == "flip" else [(0, 8192), (len(data) - 16384, len(data))]
        places = [rng.randrange(*rng.choice(spans)) for _ in range(rng.randint(1, 8))]
        for place in places:
            data[place] ^= 1 << rng.randrange(8)
        shard.write_bytes(data)
        return f"{kind} bits at {places}"
    if kind == "heap":
        return damage_global_heap(rng, shard)
    if kind == "index":
        return edit_index_randomly(rng, index)
    with h5py.File(shard, "r+") as handle:
        done = change_attribute(rng, handle) if kind == "attribute" else change_dataset(rng, handle)
        if rng.random() < 0.5 and "content_sha256" in handle.attrs:
            del handle.attrs["content_sha256"]  # as if older than the hash, so the damage meets the checks past it
            done += ", hash removed"
    return done


def damage_global_heap(rng, shard: Path) -> str:
    """Damage the block of the shard's variable-length strings (attributes, the clip table's strings): a few random
    bytes, or 16 zero bytes, which make HDF5 2.0.0 loop when they land on an object's header."""
    data = bytearray(shard.read_bytes())
    collection = data.find(b"GCOL")
    end = min(len(data), collection + struct.unpack_from("<Q", data, collection + 8)[0])
    place = rng.randrange(collection + 16, end - 16)
    if rng.random() < 0.5:
        data[place : place + 16] = bytes(16)
        done = f"heap: 16 zero bytes at {place}"
    else:
        places = [rng.randrange(collection, end) for _ in range(rng.randint(1, 4))]
        for place in places:
            data[place] = rng.randrange(256)
        done = f"heap: random bytes at {places}"
    shard.write_bytes(data)
    return done


ODD_VALUES = [0, -1, 1e10, 10**10, float("nan"), "", "x", "float64", True, "[1, 2]", '{"a":', "[]", "null",
              np.float32(3.5), np.arange(3), b"bytes"]


def change_attribute(rng, handle: h5py.File) -> str:
    name = rng.choice(sorted(handle.attrs))
    if rng.random() < 0.3:
        del handle.attrs[name]
        return f"attribute {name} deleted"
    value = rng.choice(ODD_VALUES)
    handle.attrs[name] = value
    return f"attribute {name} = {value!r}"


def change_dataset(rng, handle: h5py.File) -> str:
    name = rng.choice([f"{group}/{name}" for group in ("frames", "clips") for name in handle[group]])
    old = handle[name][()]
    rows = old.shape[0] if old.ndim else 1
    change = rng.choice(["fewer rows", "more rows", "no rows", "dtype", "strings", "scalar", "2-d", "claims"])
    del handle[name]
    if change == "claims":  # a huge shape over unwritten chunks: the file stays small
        handle.create_dataset(name, data=old, chunks=True, maxshape=(None, *old.shape[1:]))
        handle[name].resize(rng.choice([10**6, 10**8, 2**40]), axis=0)
    elif change == "fewer rows":
        handle[name] = old[: rng.randrange(rows)]
    elif change == "more rows":
        handle[name] = np.concatenate([old, old[:1].repeat(rng.randint(1, 5), axis=0)])
    elif change == "no rows":
        handle[name] = old[:0]
    elif change == "dtype":
        handle[name] = np.zeros(old.shape, rng.choice(["int8", "int64", "float16", "float64", "uint8"]))
    elif change == "strings":
        handle[name] = np.array(["x"] * rows, dtype=h5py.string_dtype())
    elif change == "scalar":
        handle[name] = np.int64(rows)
    else:
        handle[name] = np.zeros((rows, 2), np.float32)
    return f"{name}: {change}"


def edit_index_randomly(rng, index: Path) -> str:
    text = index.read_text()
    change = rng.choice(["truncate", "label", "length", "start", "clip id", "hash", "folders", "drop entries",
                         "deep", "wrong types"])
    if change == "truncate":
        index.write_text(text[: rng.randrange(len(text))])
        return "index truncated"
    if change == "deep":
        index.write_text("[" * 50_000 + "]" * 50_000)
        return "index nested deep"
    data = json.loads(text)
    clips = data["shards"][0]["clips"]
    row = rng.randrange(len(clips["clip_id"]))
    if change == "label":
        clips["label"][row] = rng.choice(["", "sad", "elated", 7])
    elif change in ("length", "start"):
        clips[change][row] = rng.choice([0, -3, 10**9, clips[change][row] + 1, "1"])
    elif change == "clip id":
        clips["clip_id"][row] = rng.choice(["", clips["clip_id"][-1], 5])
    elif change == "hash":
        data["shards"][0]["attrs"]["content_sha256"] = "0" * 64
    elif change == "folders":
        data["folders"] = [rng.choice(["/", "..", "missing", "a\0b", 3])]
    elif change == "drop entries":
        data["shards"] = []
    else:
        data["shards"][0]["clips"] = rng.choice([[], {"clip_id": "x"}, None])
    index.write_text(json.dumps(data))
    return f"index {change}"


def virtual_size() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def fuzz_child(workdir: str, cases: int, seed: int, budget_per_shard_byte: int, training_allowance: int) -> None:
    """The fuzz loop, in a child process: prints one JSON line per run of a command on a damaged set."""
    import random
    import signal

    import torch

    torch.set_num_threads(1)  # what it computes is irrelevant here; two threads on two busy cores only cost time
    logging.basicConfig(handlers=[CurrentStderr()], format=LOG_FORMAT, level=logging.WARNING, force=True)
    work = Path(workdir)
    base = write_planted_set(work / "base", "both", {"train": 6, "val": 6}, context_dim=CONTEXT_DIM)
    commands = {
        "validate": lambda root: ("features", "validate", root / "train"),
        "inspect": lambda root: ("features", "inspect", root / "train"),
        "train": lambda root: train_args(root, root / "run"),
    }
    for command in commands.values():  # warm up: every library loaded, torch's threads and caches made
        assert run_cli(*command(base))[0] == 0
        shutil.rmtree(base / "run", ignore_errors=True)
    shard_bytes = (base / SHARD).stat().st_size
    limit = virtual_size() + budget_per_shard_byte * shard_bytes + training_allowance
    look.LOOK_SECONDS, look.LOOK_MEMORY_BYTES, look.LOOK_MEMORY_PER_BYTE = (
        FUZZ_LOOK_SECONDS, training_allowance, budget_per_shard_byte)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"shard_bytes": shard_bytes, "limit": limit}), flush=True)

    def timed_out(signum, frame):
        raise RunTimedOut()

    signal.signal(signal.SIGALRM, timed_out)
    rng = random.Random(seed)
    for case in range(cases):
        root = work / f"case-{case}"
        shutil.copytree(base / "train", root / "train")
        (root / "val").symlink_to(base / "val")
        mutation = fuzz_mutation(rng, root / "train")
        print(json.dumps(dict(case=case, mutation=mutation)), flush=True)
        for name, command in commands.items():
            signal.alarm(FUZZ_RUN_SECONDS)
            try:
                status, _, stderr = run_cli(*command(root))
            except RunTimedOut:
                status, stderr = "timeout", ""
            finally:
                signal.alarm(0)
            report = dict(case=case, mutation=mutation, command=name, status=status, stderr=problem_lines(stderr))
            print(json.dumps(report), flush=True)
        shutil.rmtree(root)


class CurrentStderr(logging.StreamHandler):
    """The console handler `cli` installs, on whatever sys.stderr is now (click's runner swaps it for each command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass
