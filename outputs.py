"""Where commands write: only inside the folder the user named, never over a user's file.

- A name that comes from data (a split, a clip id) becomes a path below the output folder
  and nowhere else: split names must be plain names; clip ids keep their `/` as subfolders,
  and everything that could climb out, hide a file or stop the write (`..`, absolute paths,
  NUL and control characters, over-long names) is encoded, so two ids never share a file.
- A command writes into a folder that is new, empty, or holds only what that command writes
  there (its own earlier or unfinished work, which it resumes or refreshes). Any other folder
  is a user's: refused in one line naming it and `--overwrite`.
- Temporary files are created exclusively, never through a symlink someone left in their
  place, and renamed over the target, so a reader never sees half a file. The JSON files
  commands write are written so, and read back by one reader that never blocks on them.

Light (no torch, no h5py): the command line checks names with it before loading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from errors import UserError

TEMP_SUFFIX = ".part"
MAX_NAME_CHARS = 100
# A file system's limit on one name is 255 bytes; an encoded component is cut well below it,
# leaving room for the suffix and the tag that tells clashing names apart.
MAX_COMPONENT_BYTES = 160
TAG_CHARS = 12
# Characters of an id kept out of file names by percent-encoding: '%' itself (so the encoding
# can be told from the id), the other path separator, and what a terminal or a file manager
# would not show (control characters, among them NUL).
ENCODED = {"%", "\\"}


class OutputError(UserError):
    """An output a command will not write (a user's folder or file, a name that would escape); one line."""


def plain_name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder of its own below an output folder (None when it can)."""
    if not name:
        return "it is empty"
    if name in (".", "..") or name.startswith("."):
        return "it starts with '.'"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "it contains control characters"
    if len(name) > MAX_NAME_CHARS:
        return f"it is longer than {MAX_NAME_CHARS} characters"
    return None


def check_plain_name(name: str, what: str) -> str:
    """`name` when it is a plain name; OutputError naming `what` it is otherwise."""
    problem = plain_name_problem(name)
    if problem:
        raise OutputError(f"{what} {name!r} is not a plain name ({problem}): use letters, digits, '-' or '_'")
    return name


def _encoded(text: str, separators: str = "") -> str:
    """`text` with ENCODED characters, control characters and `separators` percent-encoded, and a
    leading '.' too (no hidden files, no '.' or '..')."""
    encoded = "".join(
        "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        if char in ENCODED or char in separators or unicodedata.category(char) == "Cc"
        else char
        for char in text
    )
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _tag(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:TAG_CHARS]


def _shortened(component: str, name: str) -> str:
    """A component cut to MAX_COMPONENT_BYTES, tagged with the whole name so cuts stay distinct."""
    if len(component.encode("utf-8")) <= MAX_COMPONENT_BYTES:
        return component
    cut = component.encode("utf-8")[: MAX_COMPONENT_BYTES - TAG_CHARS - 1].decode("utf-8", "ignore")
    return f"{cut}-{_tag(name)}"


def _readable_path(name: str) -> list[str]:
    """`name`'s components as file names: its '/' kept as subfolders, unless a part is empty
    (an absolute path, '//'): then the whole name is one component, its '/' encoded."""
    parts = name.split("/")
    if "" in parts:
        parts = [_encoded(name, separators="/")]
    else:
        parts = [_encoded(part) for part in parts]
    return [_shortened(part, name) for part in parts]


def output_paths(names: Iterable[str], suffix: str) -> dict[str, PurePosixPath]:
    """Each name's relative file path below an output folder, ending in `suffix`.

    Distinct names get distinct files, also where the file system ignores case, and no file
    takes the place of another's folder: names that would clash get a tag of their own.
    """
    paths = {name: _readable_path(name) for name in names}
    for _ in range(len(paths) + 1):
        clashing = _clashing({name: parts[:-1] + [parts[-1] + suffix] for name, parts in paths.items()})
        if not clashing:
            return {name: PurePosixPath(*parts[:-1], parts[-1] + suffix) for name, parts in paths.items()}
        for name in clashing:
            paths[name] = paths[name][:-1] + [f"{paths[name][-1]}-{_tag(name)}"]
    raise AssertionError("names still clash after tagging every one")


def _clashing(files: dict[str, list[str]]) -> set[str]:
    """Names whose file equals another's, or another's folder, ignoring case."""
    owners: dict[str, list[str]] = {}
    folders = set()
    for name, parts in files.items():
        owners.setdefault("/".join(parts).casefold(), []).append(name)
        folders.update("/".join(parts[:end]).casefold() for end in range(1, len(parts)))
    return {name for key, names in owners.items() if len(names) > 1 or key in folders for name in names}


def check_output_folder(folder: Path, command: str, overwrite: bool, writes_here: Callable[[str], bool]) -> Path:
    """`folder` if `command` may write into it (it need not exist yet); OutputError otherwise.

    A folder is `command`'s when every entry in it is a name it writes there
    (`writes_here`). Anything else is refused in one line naming the folder, the first
    entry that is not the command's and `--overwrite`, which writes into it anyway (entries
    of the names the command writes are then replaced; nothing else is touched).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder: choose another output folder")
    if folder.is_dir() and not overwrite:
        foreign = sorted(name for name in os.listdir(folder) if not writes_here(name))
        if foreign:
            more = f" and {len(foreign) - 1} more entries" if len(foreign) > 1 else ""
            raise OutputError(
                f"{folder} holds {foreign[0]!r}{more} that {command} did not write: choose a new or empty folder,"
                " or pass --overwrite to write into it"
            )
    return folder


def claim_folder(folder: Path, command: str, overwrite: bool, writes_here: Callable[[str], bool]) -> Path:
    """`check_output_folder`, then create the folder; returns it."""
    check_output_folder(folder, command, overwrite, writes_here).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def is_temporary(name: str) -> bool:
    """A temporary file of `write_atomically` (left by a killed process)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def exclusive_temporary(path: Path) -> Path:
    """A new empty file beside `path`, hidden, created only if nothing (not even a symlink) has its name.

    It gets the user's usual permissions (the umask's), unlike mkstemp's owner-only ones, so a
    file renamed from it can be shared like any other.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(temporary, flags, 0o666))
        except FileExistsError:
            continue
        return temporary


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file beside it, so a reader never sees half a file.

    `write(temporary)` fills the temporary file, which is then renamed over `path` (a symlink
    at `path` is replaced, never followed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = exclusive_temporary(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def fsync_path(path: Path) -> os.stat_result:
    """Flush the file or folder at `path` to the disk; returns the status of what was flushed (which may no longer
    be what `path` names)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data) -> None:
    """`data` as indented JSON with sorted keys, written atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=1, sort_keys=True),
                                                                  encoding="utf-8"))


def read_json_object(path: Path) -> dict | None:
    """A JSON file holding an object; None when it is missing, not a regular file, unreadable or anything else."""
    if not Path(path).is_file():  # a FIFO or a device there would block or never end
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def create_new_file(path: Path, text: str) -> None:
    """Write `text` to `path` if nothing (not even a symlink) has that name yet; else leave it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


def user_cache(kind: str, env: str) -> Path:
    """Where this toolkit keeps its `kind` of cache: $`env`, else ~/.cache/caca-rnn/`kind`
    ($XDG_CACHE_HOME honoured)."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caca-rnn" / kind
