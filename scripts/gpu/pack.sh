# Sourced by the `prepare` step of scripts/gpu/{kernels,distill}.sh: build cargo targets here
# with the `cuda` feature and pack their executables (stripped, xz'd) into the git-ignored .gpu/
# with what every device run needs (the commit, the loader path helper, the peer benchmarks with
# their vendored Triton sources). See ../shared/gpu/device-run.md.
#
#   gpu_pack "name1 name2 ..." cargo <subcommand and target flags ...>
#
# runs `cargo <args> --features cuda --no-run` with MATVLM_COMMIT set, and packs the executable
# cargo reports for each named target. CUDA comes from ../shared/gpu/cuda-env.sh unless CUDA_ROOT
# is set (source it every time, same environment, or candle's kernels rebuild); the target dir
# is TARGET_DIR, else CARGO_TARGET_DIR, else target/cuda.

gpu_pack() {
  local names="$1"
  shift
  local shared="${SHARED:-$(cd .. && pwd)/shared}"
  [ -d "$shared/gpu" ] || shared=/work/shared
  if [ -z "${CUDA_ROOT:-}" ]; then
    set +eu
    # shellcheck disable=SC1091
    source "$shared/gpu/cuda-env.sh"
    set -eu
  fi
  export CARGO_TARGET_DIR="${TARGET_DIR:-${CARGO_TARGET_DIR:-target/cuda}}"
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu' .gitignore 2>/dev/null \
    || echo '/.gpu/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  local report=.gpu/cargo-report.json
  # The executables of the targets, from cargo's own report (their names carry a hash).
  MATVLM_COMMIT="$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +)" \
  "$@" --features cuda --no-run --message-format=json-render-diagnostics > "$report"
  local b exe
  for b in $names; do
    exe=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable"):
        print(m["executable"])' "$report" "$b" | tail -n 1)
    [ -n "$exe" ] || { echo "pack.sh: cargo reported no executable for $b" >&2; return 1; }
    echo "$b: $exe"
    strip -o ".gpu/$b" "$exe"
    xz -f -T2 ".gpu/$b"
  done
  rm -f "$report"
  { git rev-parse --short HEAD; git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)"; } > .gpu/commit.txt || true
  cp "$shared/gpu/device-libpath.sh" .gpu/
  rm -rf .gpu/peer && cp -r "$shared/peer" .gpu/peer && chmod -R u+w .gpu/peer
  [ -d .gpu/peer/vendor/mamba_ssm ] || bash .gpu/peer/fetch-vendor.sh .gpu/peer
  du -sh .gpu
}
