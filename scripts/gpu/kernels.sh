#!/usr/bin/env bash
# Issue 7 on the GPU machine: parity of the Mamba-2 CUDA kernels (kernel_check), their timings
# (kernel_bench) and the peer mamba_ssm Triton benchmark (sections a, b) in ONE run, so every
# ratio comes from one machine and one call.
#
# Steps (see ../shared/gpu/device-run.md):
#   1. Here, build (source cuda-env.sh every time, same environment, or candle's kernels rebuild):
#        source ../shared/gpu/cuda-env.sh
#        cargo build --release --features cuda --bin kernel_check --bin kernel_bench
#      (inside a worktree that shares the lead's CUDA target dir, add
#       CARGO_TARGET_DIR=/work/main/target/cuda and --config 'profile.release.package.matvlm.codegen-units=N')
#   2. Here, pack what travels into the git-ignored .gpu/ (binaries stripped + xz'd, the loader
#      path helper, the peer benchmark with its vendored Triton sources):
#        TARGET_DIR=/work/main/target/cuda bash scripts/gpu/kernels.sh prepare
#   3. There, with `.gpu` carried (run tool: carry [".gpu"], timeout_s 600):
#        bash scripts/gpu/kernels.sh run
#      Results under $OUT (at most 8 files come back): env.txt, kernel_check.jsonl,
#      kernel_bench.jsonl, peer.jsonl, peer_summary.txt, ratios.txt, run.log.
#      Exit status: kernel_check's (non-zero if any comparison failed).
#   Budget: kernel_check ~1 min, kernel_bench ~2 min, peer a,b ~3 min with a cold Triton cache.
set -u
cd "$(dirname "$0")/../.."
mode="${1:-run}"

if [ "$mode" = prepare ]; then
  set -e
  target="${TARGET_DIR:-${CARGO_TARGET_DIR:-target}}/release"
  shared="${SHARED:-$(cd .. && pwd)/shared}"
  [ -d "$shared/gpu" ] || shared=/work/shared
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu' .gitignore 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  for b in kernel_check kernel_bench; do
    strip -o ".gpu/$b" "$target/$b"
    xz -f -T2 ".gpu/$b"
  done
  cp "$shared/gpu/device-libpath.sh" .gpu/
  rm -rf .gpu/peer && cp -r "$shared/peer" .gpu/peer && chmod -R u+w .gpu/peer
  [ -d .gpu/peer/vendor/mamba_ssm ] || bash .gpu/peer/fetch-vendor.sh .gpu/peer
  du -sh .gpu
  exit 0
fi

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
log="$OUT/run.log"
for b in kernel_check kernel_bench; do
  xz -dkf ".gpu/$b.xz" && chmod +x ".gpu/$b"
done
export LD_LIBRARY_PATH="$(bash .gpu/device-libpath.sh)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1

echo "== kernel_check" | tee -a "$log"
.gpu/kernel_check > "$OUT/kernel_check.jsonl" 2>> "$log"
check_rc=$?
echo "kernel_check rc=$check_rc" | tee -a "$log"
grep -c '"pass":false' "$OUT/kernel_check.jsonl" | sed 's/^/failures: /' | tee -a "$log"

echo "== kernel_bench" | tee -a "$log"
.gpu/kernel_bench > "$OUT/kernel_bench.jsonl" 2>> "$log"
echo "kernel_bench rc=$?" | tee -a "$log"

echo "== peer (mamba_ssm Triton, sections a,b)" | tee -a "$log"
peer_out=$(mktemp -d)
OUT="$peer_out" bash .gpu/peer/run_peer.sh --sections a,b >> "$log" 2>&1
echo "peer rc=$?" | tee -a "$log"
cp "$peer_out/peer.jsonl" "$OUT/peer.jsonl" 2>/dev/null
cp "$peer_out/summary.txt" "$OUT/peer_summary.txt" 2>/dev/null
tail -n 5 "$peer_out/peer.stderr" >> "$log" 2>/dev/null

# Ratios per shape (Triton time / our time: > 1 means ours is faster), from this one run.
python3 - "$OUT/kernel_bench.jsonl" "$OUT/peer.jsonl" > "$OUT/ratios.txt" 2>> "$log" <<'PY'
import json, sys
def load(p):
    try:
        return [json.loads(l) for l in open(p) if l.strip().startswith("{")]
    except OSError:
        return []
ours, peer = load(sys.argv[1]), load(sys.argv[2])
BW = 4.3e3  # GB/s the machine copies at (device-run notes)
print(f"{'what':<34} {'ours ms':>9} {'triton ms':>10} {'ratio':>7} {'our GB/s':>9}")
for r in ours:
    if r.get("impl") != "kernel":
        continue
    if r.get("name") in ("scan_fwd", "scan_fwd_bwd"):
        key = lambda p: (p.get("section") == "a" and p.get("name") == r["name"] and p.get("batch") == r["batch"]
                         and p.get("seqlen") == r["seqlen"] and p.get("with_z") == r.get("with_z"))
        ms = r.get("ms_median")
        t = next((p.get("ms_median") for p in peer if key(p) and "ms_median" in p), None)
        what = f"{r['name']} b{r['batch']} L{r['seqlen']} z={int(r.get('with_z', False))} {r['impl']}"
        gbps = r.get("gbps_io")
    elif r.get("name") == "state_update":
        key = lambda p: (p.get("section") == "b" and p.get("batch") == r["batch"] and p.get("state_dtype") == "fp32")
        ms = r["us_median"] / 1e3
        t = next((p["ms_median"] for p in peer if key(p) and "ms_median" in p), None)
        what = f"state_update b{r['batch']} (state {100 * r['gbps_state'] / BW:.0f}% of BW)"
        gbps = r.get("gbps_state")
    else:
        continue
    if ms is None:
        continue
    ratio = f"{t / ms:.2f}" if t else "-"
    print(f"{what:<34} {ms:>9.4f} {t if t else '-':>10} {ratio:>7} {gbps if gbps else '-':>9}")
PY
cat "$OUT/ratios.txt"
exit $check_rc
