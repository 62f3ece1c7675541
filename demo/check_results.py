"""Check the demo's promise on its own results (README, "The demo"): on the validation split the
fusion models and the models that hear and see reach 100% accuracy, face-only, context-only and
audio-only 50%.

CI runs it after `./run main`:

    python -m demo.check_results outputs/demo      # the demo's folder (`cli.py demo --out`)

Prints one line per model that misses, and exits 1 if any does.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from demo.run import MODELS
from outputs import read_json_object
from train.config import DEFAULT_VAL_SPLIT
from train.layout import METRICS_FILE, evaluation_folder
from train.metrics import Metrics

PROMISED_ACCURACY = {"face": 0.5, "context": 0.5, "audio": 0.5, "concat": 1.0, "parallel": 1.0, "caca": 1.0,
                     "face-audio": 1.0, "caca-av": 1.0}


def broken_promises(out: Path) -> list[str]:
    """One line per demo model whose validation accuracy (its eval-val/metrics.json) is not the promised one."""
    problems = []
    for model in MODELS:
        metrics_file = evaluation_folder(out / "runs" / model, DEFAULT_VAL_SPLIT) / METRICS_FILE
        metrics = Metrics.from_json(read_json_object(metrics_file))
        if metrics is None:
            problems.append(f"{model}: no validation metrics in {metrics_file}; run `python cli.py demo`")
            continue
        accuracy = metrics.accuracy
        if not math.isclose(accuracy, PROMISED_ACCURACY[model], abs_tol=1e-9):
            problems.append(f"{model}: validation accuracy {accuracy:.4f}, the README promises "
                            f"{PROMISED_ACCURACY[model]:.0%} ({metrics_file})")
    return problems


def main(args: list[str]) -> int:
    if len(args) != 1:
        print("usage: python -m demo.check_results DEMO_FOLDER", file=sys.stderr)
        return 2
    problems = broken_promises(Path(args[0]))
    for line in problems:
        print(f"demo check: {line}", file=sys.stderr)
    if not problems:
        print(f"demo check: {', '.join(f'{m} {PROMISED_ACCURACY[m]:.0%}' for m in MODELS)} on validation, as promised")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
