#!/usr/bin/env bash
# Execute every notebook in notebooks/ headlessly with the evcxr Rust kernel (jupyter nbconvert)
# and exit non-zero if any cell of any notebook fails.
#
# Installs what is missing, and only that:
#   * evcxr_jupyter, with `cargo install --locked` (about 11 min on 2 cores; skipped when on PATH);
#   * a Python venv .nbenv with nbconvert, and the "rust" kernel spec inside it.
# Executed notebooks go to .nbout/. Every notebook has the same `:dep` set, so they share one
# evcxr build folder (.nbbuild, EVCXR_TMPDIR): matvlm and candle are compiled once, by the
# first notebook, and only matvlm again when its sources change. All four folders are
# git-ignored. Timings are printed and written to .nbout/timings.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
# The kernel's cargo builds in .nbbuild; a target dir set for the project's own builds would
# mix the two (and their locks).
unset CARGO_TARGET_DIR
mkdir -p .nbout
timings=.nbout/timings.txt
: >"$timings"
note() { echo "$*" | tee -a "$timings"; }

t0=$(date +%s)
if ! command -v evcxr_jupyter >/dev/null; then
    echo "evcxr_jupyter not found: cargo install --locked evcxr_jupyter (about 11 min on 2 cores)"
    cargo install --locked evcxr_jupyter
fi
note "evcxr_jupyter ready: $(($(date +%s) - t0)) s ($(command -v evcxr_jupyter))"

t0=$(date +%s)
if [ ! -x .nbenv/bin/jupyter-nbconvert ]; then
    python3 -m venv .nbenv
    .nbenv/bin/pip install -q nbconvert
fi
# The kernel spec "rust" inside the venv, pointing at this evcxr_jupyter.
JUPYTER_DATA_DIR="$root/.nbenv/share/jupyter" evcxr_jupyter --install >/dev/null
note "nbconvert venv and kernel spec ready: $(($(date +%s) - t0)) s"

export EVCXR_TMPDIR="$root/.nbbuild" XDG_CACHE_HOME="$root/.nbcache"
mkdir -p "$EVCXR_TMPDIR" "$XDG_CACHE_HOME"
failed=()
for nb in notebooks/*.ipynb; do
    t0=$(date +%s)
    if .nbenv/bin/jupyter nbconvert --to notebook --execute \
        --ExecutePreprocessor.kernel_name=rust --ExecutePreprocessor.timeout=1800 \
        "$nb" --output-dir .nbout; then
        note "$(basename "$nb"): ok in $(($(date +%s) - t0)) s"
    else
        note "$(basename "$nb"): FAILED after $(($(date +%s) - t0)) s"
        failed+=("$nb")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "notebooks that failed: ${failed[*]} (the failing cell and its error are printed above)" >&2
    exit 1
fi
echo "all notebooks ran; executed copies in .nbout/"
