"""A shard that hangs, crashes or exhausts HDF5 never takes a command with it (features/look.py).

The hang is real: 16 bytes of a real shard's global heap (the block of its variable-length
strings) set so that HDF5 2.0.0's heap decoder never advances, checked first to hang h5py
itself. No real crash of HDF5 2.0.0 was found (400 random damages of the same bytes only
ever hung it or were refused), so a crash is a helper that kills itself. The memory limit is
met by a real shard whose clip table holds 64 MB of strings.

Commands run in-process (as in test_hostile_features) with a look of at most 0.5 s, under
faulthandler's watchdog: a regression that hung this process would end the run with every
thread's traceback instead of hanging CI.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cli import EXIT_ERROR, EXIT_INTERRUPTED
from features import look
from features.reader import open_features, read_shard_info
from features.schema import FeatureFileError, shard_name
from tests.cli_runs import one_line_error, run_cli
from tests.test_hostile_features import SHARD, problem_lines, train_args

ROOT = Path(__file__).resolve().parents[1]
LOOK_SECONDS = 0.5  # what a look at these tiny shards may take here: honest ones take milliseconds
HANG = f"did not finish parsing its metadata within {LOOK_SECONDS:.1f} s"
WATCHDOG_SECONDS = 300


def loop_global_heap(shard: Path) -> None:
    """Set the first object of the shard's first global heap collection to index 0 and size 0: HDF5's decoder
    takes it for the free space, which it skips by its size, 0, for ever."""
    data = bytearray(shard.read_bytes())
    collection = data.find(b"GCOL")  # signature, version, 3 reserved bytes, the collection's size, then objects
    assert collection > 0
    struct.pack_into("<HHIQ", data, collection + 16, 0, 0, 0, 0)  # index, references, reserved, size
    shard.write_bytes(data)


@pytest.fixture
def looping(root) -> Path:
    """A copy of the set whose train shard loops HDF5."""
    loop_global_heap(root / SHARD)
    return root


@pytest.fixture
def quick_looks(monkeypatch):
    """Quick looks, and the watchdog."""
    monkeypatch.setattr(look, "LOOK_SECONDS", LOOK_SECONDS)
    monkeypatch.setattr(look, "LOOK_BYTES_PER_SECOND", float("inf"))
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def trained_run(pristine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    status, _, stderr = run_cli(*train_args(pristine, out))
    assert status == 0, stderr
    return out


def test_the_crafted_heap_hangs_hdf5_itself(looping, pristine):
    """Without the helper, reading the shard's attributes never ends; the pristine shard's reads in a moment."""
    read = "import h5py, sys; h5py.File(sys.argv[1], 'r', locking=False).attrs['created']"
    subprocess.run([sys.executable, "-c", read, str(pristine / SHARD)], check=True, timeout=60)
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", read, str(looping / SHARD)], timeout=2)


READERS = {
    "inspect": lambda root, out, run: ("features", "inspect", root / "train"),
    "report": lambda root, out, run: ("features", "report", root / "train", "--out", out),
    "merge": lambda root, out, run: ("features", "merge", root / "train", "--out", out),
    "repack": lambda root, out, run: ("features", "repack", root / "train", "--out", out, "--compression", "none"),
    "train": lambda root, out, run: train_args(root, out),
    "evaluate": lambda root, out, run: ("evaluate", "--run", run, "--split", "train", "--features", root,
                                        "--device", "cpu"),
    "compare": lambda root, out, run: ("compare", "--models", "face", "--seeds", 1, "--epochs", 1, "--features", root,
                                       "--out", out, "--device", "cpu"),
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_every_reader_refuses_a_shard_that_loops_hdf5_in_one_line(command, looping, trained_run, tmp_path,
                                                                  quick_looks):
    status, _, stderr = run_cli(*READERS[command](looping, tmp_path / "out", trained_run))
    one_line_error(status, stderr, str(looping / SHARD), HANG, "damaged or crafted")


def test_validate_lists_a_shard_that_loops_hdf5_and_checks_the_others(looping, quick_looks):
    other = looping / "train" / shard_name(1)
    shutil.copy(looping / "val" / shard_name(0), other)  # valid, and not in train's index
    status, _, stderr = run_cli("features", "validate", looping / "train")
    problems = problem_lines(stderr)
    assert status == EXIT_ERROR
    assert [line for line in problems if HANG in line] == [
        f"{looping / SHARD}: refused: HDF5 {HANG} (it loops forever on some damaged files); the file is damaged or"
        " crafted"
    ]
    assert f"{looping / 'train' / 'index.json'}: does not list {other}" in problems  # looked at, and read


def helpers_of(parent: int) -> list[int]:
    """The look helpers that `parent` started and that are still running."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and look.HELPER_CODE.encode() in arguments and str(parent).encode() in arguments:
            found.append(int(entry.name))
    return found


def test_a_real_validate_process_exits_1_and_leaves_no_helper_behind(looping):
    """The process matters here: its exit status, stderr, and no helper left looping after it."""
    code = (f"import sys; from features import look; look.LOOK_SECONDS = {LOOK_SECONDS};"
            " look.LOOK_BYTES_PER_SECOND = float('inf'); from cli import cli; cli(sys.argv[1:], prog_name='cli.py')")
    process = subprocess.Popen([sys.executable, "-c", code, "features", "validate", str(looping / "train")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_ERROR
    assert [line for line in problem_lines(stderr) if HANG in line], stderr
    assert helpers_of(process.pid) == []


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_a_command_stopped_while_its_helper_loops_takes_the_helper_with_it(looping, how):
    # Ctrl-C as in a shell's foreground job, even where the tests run in the background (which ignores SIGINT, and a
    # child inherits that); and a look that waits far longer than the test does, so that the signal always comes
    # while it waits, however slowly a loaded machine lets the helper start looping.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " from features import look; look.LOOK_SECONDS = 600;"
            " from cli import cli; cli(sys.argv[1:], prog_name='cli.py')")
    process = subprocess.Popen([sys.executable, "-c", code, "features", "inspect", str(looping / "train")], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not helpers_of(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    helpers = helpers_of(process.pid)
    while helpers and cpu_seconds(helpers[0]) < 1 and time.monotonic() < deadline:  # started (0.2 s), then looping
        time.sleep(0.05)
    assert helpers and cpu_seconds(helpers[0]) >= 1 and process.poll() is None
    process.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        dispositions = signal_lines(process.pid)  # blocked, ignored or caught: why the signal did nothing
        process.kill()
        raise AssertionError(f"still running 60 s after {how}: {dispositions}") from None
    if how == "Ctrl-C":
        assert (process.returncode, stderr) == (EXIT_INTERRUPTED, "interrupted\n")
    while any(running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in helpers)


def signal_lines(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return "; ".join(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


CRASHING_HELPER = (
    "import os, signal, sys; sys.path[0] = sys.argv[1]; import features.reader as reader; looked_at = reader.looked_at;"
    " reader.looked_at = lambda request: os.kill(os.getpid(), signal.SIGSEGV) if request['path'].endswith('crash.h5')"
    " else looked_at(request); from features.look import serve; serve(int(sys.argv[2]))"
)


def test_a_crash_of_the_helper_is_one_line_and_the_next_shard_gets_a_new_one(root, monkeypatch, quick_looks):
    monkeypatch.setattr(look, "HELPER_CODE", CRASHING_HELPER)
    look.stop_helper()  # a helper of the real code may be running from earlier tests
    crashing = root / "train" / "crash.h5"
    (root / SHARD).rename(crashing)
    status, _, stderr = run_cli("features", "inspect", root / "train")
    one_line_error(status, stderr, f"{crashing}: refused: parsing its metadata crashed the HDF5 library (SIGSEGV)")
    shutil.copy(root / "val" / shard_name(0), root / "train" / shard_name(1))
    status, _, stderr = run_cli("features", "validate", root / "train")
    problems = problem_lines(stderr)
    assert f"{crashing}: refused: parsing its metadata crashed the HDF5 library (SIGSEGV); the file is damaged or" \
           " crafted" in problems
    assert f"{root / 'train' / 'index.json'}: does not list {root / 'train' / shard_name(1)}" in problems
    look.stop_helper()


def test_a_look_that_needs_more_memory_than_its_limit_is_refused(root, monkeypatch):
    with h5py.File(root / SHARD, "r+") as handle:  # a valid shard (its hash removed) with 8 MB source paths
        clips = handle["clips/source_path"].shape[0]
        del handle["clips/source_path"]
        handle["clips/source_path"] = np.array(["x" * (8 << 20)] * clips, dtype=h5py.string_dtype())
        del handle.attrs["content_sha256"]
    shard = read_shard_info(root / SHARD)  # within the default limit: read
    assert len(shard.table["source_path"][0]) == 8 << 20
    monkeypatch.setattr(look, "LOOK_MEMORY_BYTES", 32 << 20)
    monkeypatch.setattr(look, "LOOK_MEMORY_PER_BYTE", 0)
    os.utime(root / SHARD)  # another file for this process: looked at again
    status, _, stderr = run_cli("features", "inspect", root / "train")
    one_line_error(status, stderr, f"{root / SHARD}: refused: parsing its metadata needs more than 32 MiB of memory")


def test_a_shard_this_process_looked_at_is_not_looked_at_again(root, monkeypatch):
    asked = []
    ask = look.ask
    monkeypatch.setattr(look, "ask", lambda request, size: asked.append(request["path"]) or ask(request, size))
    for _ in range(2):
        with open_features(root / "train") as features:
            assert len(features) == 8
    assert asked == [str(root / SHARD)]


def test_a_shard_replaced_after_the_look_is_never_read_unlooked(root):
    with open_features(root / "train") as features:
        loop_global_heap(root / SHARD)  # write_bytes: the same inode, a new ctime
        with pytest.raises(FeatureFileError, match="changed since the set was opened; open the set again"):
            features.read(features.clip_ids[0])
