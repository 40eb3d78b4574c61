#!/usr/bin/env bash
# Installs what scripts/run_notebooks.sh needs and is missing, and only that:
#   * evcxr_jupyter, with `cargo install --locked`;
#   * a Python venv .nbenv with nbconvert, and the "rust" kernel spec inside it.
# .ci/run starts it in the background, niced, while the tests build; run_notebooks.sh calls it
# first, when it finds everything already there it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
# The settings the notebooks' crate shares with the test build are not for this binary: with
# RUSTFLAGS=-Cprefer-dynamic it would need libstd's .so at run time. cargo install's own
# temporary target dir keeps its release build apart from the project's.
unset RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR
if ! command -v evcxr_jupyter >/dev/null; then
    # About 13 CPU-minutes, mostly rustc's front end on its rust-analyzer crates: building it
    # at opt-level 1 saved only 5% of that, so it keeps its release profile.
    # In a CARGO_HOME of its own: the crates it downloads (newer versions of some of the
    # notebooks' dependencies among them) stay out of the registry that the notebooks' kernel
    # resolves from offline (run_notebooks.sh). Installed where PATH looks, as before.
    echo "evcxr_jupyter not found: cargo install --locked evcxr_jupyter (about 13 CPU-minutes)"
    root_dir=${CARGO_HOME:-$HOME/.cargo}
    build_home=$(mktemp -d)
    trap 'rm -rf "$build_home"' EXIT
    for f in config.toml config credentials.toml; do
        if [ -f "$root_dir/$f" ]; then cp "$root_dir/$f" "$build_home/"; fi
    done
    CARGO_HOME="$build_home" cargo install --locked --root "$root_dir" evcxr_jupyter
fi
if [ ! -x .nbenv/bin/jupyter-nbconvert ]; then
    python3 -m venv .nbenv
    .nbenv/bin/pip install -q nbconvert
fi
# The kernel spec "rust" inside the venv, pointing at this evcxr_jupyter (evcxr_jupyter --install
# writes to $JUPYTER_PATH/kernels, else to the user's data dir).
JUPYTER_PATH="$root/.nbenv/share/jupyter" evcxr_jupyter --install >/dev/null
