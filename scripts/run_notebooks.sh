#!/usr/bin/env bash
# Execute every notebook in notebooks/ headlessly with the evcxr Rust kernel (jupyter nbconvert)
# and exit non-zero if any cell of any notebook fails.
#
# Installs what is missing, and only that (scripts/install_notebook_tools.sh):
#   * evcxr_jupyter, with `cargo install --locked`;
#   * a Python venv .nbenv with nbconvert, and the "rust" kernel spec inside it.
# The kernel's crate lives in .nbbuild (EVCXR_TMPDIR; the notebooks' `:dep matvlm = { path =
# ".." }` is relative to it) and builds in the project's target dir (CARGO_TARGET_DIR, else
# target/), under target/<host triple>/ as evcxr passes --target. It is built with
# scripts/shared_build_env.sh plus the settings below, so after
# `source scripts/shared_build_env.sh && cargo test` (what .ci/run does) every dependency is
# already compiled and only matvlm and the cells are; otherwise the first notebook compiles
# candle & co. once and later runs reuse them. Executed notebooks go to .nbout/; timings are
# printed and written to .nbout/timings.txt. .nbenv, .nbcache, .nbbuild, .nbout are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p .nbout
timings=.nbout/timings.txt
: >"$timings"
note() { echo "$*" | tee -a "$timings"; }

t0=$(date +%s)
scripts/install_notebook_tools.sh
note "evcxr_jupyter, nbconvert venv and kernel spec ready: $(($(date +%s) - t0)) s ($(command -v evcxr_jupyter))"

# shellcheck source=scripts/shared_build_env.sh
source scripts/shared_build_env.sh
# The rest of the test build's profile as the kernel must see it to ask for the same
# dependency artifacts: Cargo.toml's [profile.dev] debug and [profile.dev.package."*"]
# opt-level (which in the test build covers dependencies' build scripts and proc macros too).
# Cargo reads no per-package profile from the environment, so opt-level 3 also applies to
# matvlm and the cells here.
export CARGO_PROFILE_DEV_OPT_LEVEL=3 CARGO_PROFILE_DEV_BUILD_OVERRIDE_OPT_LEVEL=3
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
target_dir=${CARGO_TARGET_DIR:-$root/target}
unset CARGO_TARGET_DIR
export EVCXR_TMPDIR="$root/.nbbuild" XDG_CACHE_HOME="$root/.nbcache"
mkdir -p "$EVCXR_TMPDIR" "$XDG_CACHE_HOME" "$target_dir"
# evcxr always builds in $EVCXR_TMPDIR/target; a real folder there is an older private build.
if [ ! -L "$EVCXR_TMPDIR/target" ]; then
    rm -rf "$EVCXR_TMPDIR/target"
fi
ln -sfn "$target_dir" "$EVCXR_TMPDIR/target"
# The kernel's crate resolves its dependencies afresh, without the project's Cargo.lock (evcxr
# first builds it with no dependency, which empties any lock file put there). Offline, cargo
# picks only among downloaded crates: on a fresh machine those are the locked versions, fetched
# here, so the kernel gets the versions the tests were built with (and their artifacts).
# Elsewhere it takes the newest downloaded ones and still runs, compiling what differs.
# (All platforms' crates: no build target, as the resolve covers every platform.)
env -u CARGO_BUILD_TARGET cargo fetch --locked --quiet
export CARGO_NET_OFFLINE=true

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
