"""A process's first look at a shard, made in a helper process that a hang or a crash of HDF5 cannot take with it.

HDF5 parses a shard's metadata in C, where no Python code can interrupt it: HDF5 2.0.0 loops
forever on a shard whose global heap (the block of its variable-length strings) is damaged
in certain bytes, and the library has a long record of crashes on crafted files. So a
process never parses a shard before one helper process has parsed everything the process
will parse of it (`reader.examine_shard`: the attributes, every dataset's header and chunk
index, the clip table with its strings), under a time limit that grows with the shard's
size and a memory limit. A shard that hangs the helper, crashes it or exceeds its memory is
refused (`LookFailed`, said in one line by the reader); the helper is then replaced for the
next shard.

One helper per process, started with the first shard that process looks at and reused for
every later one, so a set of many shards pays for one start (about a quarter of a second:
Python, numpy and h5py). Requests and replies are JSON lines, so nothing a shard holds is
ever unpickled here. The helper dies with the process that started it (Linux's parent-death
signal), even when that process is killed while the helper loops.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from errors import UserError

# A look at a shard may take this long, plus its bytes at LOOK_BYTES_PER_SECOND. An honest
# shard takes milliseconds (metadata and the clip table, not the arrays): these bound a hang.
LOOK_SECONDS = 10.0
LOOK_BYTES_PER_SECOND = 8e6
# A look may allocate this much beyond what the started helper holds, plus LOOK_MEMORY_PER_BYTE
# times the shard's bytes (the strings of a clip table are stored in the file; Python's
# objects for them take a few times that).
LOOK_MEMORY_BYTES = 1 << 30
LOOK_MEMORY_PER_BYTE = 4
# How HDF5 and numpy say that an allocation failed under the helper's memory limit.
ALLOCATION_FAILED = ("memory allocation failed", "Cannot allocate memory", "unable to allocate")
START_SECONDS = 120.0  # a fresh interpreter importing numpy and h5py, on a loaded machine
ROOT = Path(__file__).resolve().parents[1]

# The helper's own program. sys.path[0] is replaced before anything is imported, so no module
# in the current folder (where shards from elsewhere may lie) can stand in for one of ours.
HELPER_CODE = "import sys; sys.path[0] = sys.argv[1]; from features.look import serve; serve(int(sys.argv[2]))"


class LookFailed(Exception):
    """The helper did not give an answer for a shard; the message says what happened, not naming the file."""


class HelperUnavailable(UserError):
    """The helper process could not be started (this machine's limits, a broken installation)."""


def limits(size: int) -> tuple[float, int]:
    """The seconds and the bytes of memory a look at a shard of `size` bytes may take."""
    return LOOK_SECONDS + size / LOOK_BYTES_PER_SECOND, LOOK_MEMORY_BYTES + LOOK_MEMORY_PER_BYTE * size


class Helper:
    """One helper process: requests in, replies out, one at a time."""

    def __init__(self):
        self.errors = tempfile.TemporaryFile()  # what the helper says if it cannot start
        environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", HELPER_CODE, str(ROOT), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, env=environment,
                start_new_session=True,  # Ctrl-C in a terminal reaches the command, which stops the helper
            )
        except OSError as exc:
            raise HelperUnavailable(f"cannot start the process that checks shards before reading them ({exc})") from None
        if self.reply(time.monotonic() + START_SECONDS) != {"ready": True}:
            self.stop()
            raise HelperUnavailable(
                f"the process that checks shards before reading them did not start: {self.said() or 'no message'}"
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def said(self) -> str:
        """The last line the helper wrote to stderr."""
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def ask(self, request: dict, seconds: float, memory: int) -> dict:
        """The helper's reply to `request`; LookFailed when it hangs, crashes or runs out of memory."""
        try:
            self.process.stdin.write(json.dumps(dict(request, memory=memory)).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # died: said below
        reply = self.reply(time.monotonic() + seconds)
        if reply is None:
            raise LookFailed(f"HDF5 did not finish parsing its metadata within {seconds:.1f} s (it loops forever on"
                             " some damaged files)")
        if reply is EOF:
            raise LookFailed(f"parsing its metadata crashed the HDF5 library ({died_of(self.process.returncode)})")
        if reply.get("memory"):
            raise LookFailed(f"parsing its metadata needs more than {memory / 2**20:,.0f} MiB of memory")
        if "bug" in reply:
            raise RuntimeError(f"the process that checks shards failed: {reply['bug']}")
        return reply

    def reply(self, deadline: float):
        """The next JSON line from the helper: a dict, EOF when it died, None when the deadline passed."""
        out, line = self.process.stdout.fileno(), bytearray()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                return None
            chunk = os.read(out, 1 << 20)
            if not chunk:
                self.process.wait()
                return EOF
            line += chunk
        return json.loads(line)

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout, self.errors):
            try:
                pipe.close()
            except BrokenPipeError:  # stdin's buffer, flushed into a dead helper
                pass


EOF = object()


def died_of(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


_helper: Helper | None = None
_helper_pid = 0  # the process that started it: a forked child starts its own
_lock = threading.Lock()


def ask(request: dict, size: int) -> dict:
    """The helper's reply to `request` about a shard of `size` bytes, within `limits(size)`; LookFailed when none came."""
    global _helper, _helper_pid
    seconds, memory = limits(size)
    with _lock:
        if _helper is None or _helper_pid != os.getpid() or not _helper.alive():
            if _helper is not None and _helper_pid == os.getpid():
                _helper.stop()
            _helper, _helper_pid = Helper(), os.getpid()
        try:
            return _helper.ask(request, seconds, memory)
        except BaseException:  # hung, crashed, out of memory, or this process interrupted while it owes a reply
            _helper.stop()
            _helper = None  # the next shard gets a new one
            raise


@atexit.register
def stop_helper() -> None:
    global _helper
    if _helper is not None and _helper_pid == os.getpid():
        _helper.stop()
    _helper = None


# --- the helper's side --------------------------------------------------------------------------


def serve(parent: int) -> None:
    """The helper's loop: one JSON request a line on stdin, one JSON reply a line on stdout, until stdin closes."""
    import resource

    die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file in the user's folder
    from features.reader import looked_at  # numpy and h5py: the start's cost

    reply(ready=True)
    started = virtual_bytes()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        wanted = started + request.pop("memory")
        resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
        try:
            answer = looked_at(request)
            if any(failed in problem for problem in answer["problems"] for failed in ALLOCATION_FAILED):
                answer = {"memory": True}
        except MemoryError:
            answer = {"memory": True}
        except Exception as exc:  # a bug of ours: said to the parent, which raises it
            answer = {"bug": f"{type(exc).__name__}: {exc}"}
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        reply(**answer)


def reply(**answer) -> None:
    sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
    sys.stdout.buffer.flush()


def die_with_parent(parent: int) -> None:
    """Killed when the process that started this one ends, even while HDF5 loops here (Linux; elsewhere the
    closed stdin ends the loop once HDF5 returns)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the signal was asked for
        os._exit(0)


def virtual_bytes() -> int:
    """This process's address space, which RLIMIT_AS bounds."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
