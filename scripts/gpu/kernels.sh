#!/usr/bin/env bash
# Issue 7 on the GPU machine: parity of the Mamba-2 CUDA kernels (kernel_check), their timings
# (kernel_bench) and the peer mamba_ssm Triton benchmark (sections a, b) in ONE run, so every
# ratio comes from one machine and one call.
#
# The two programs are cargo targets with their own main, built only with the `cuda` feature
# (Cargo.toml: the test `kernel_check`, tests/kernel_check.rs; the bench `kernel_bench`,
# benches/kernel_bench.rs); `prepare` builds them here and packs their executables, which run
# there with no cargo.
#
# Steps (see ../shared/gpu/device-run.md):
#   1. Here, build and pack what travels into the git-ignored .gpu/ (both executables stripped +
#      xz'd, the commit they were built at, the loader path helper, the peer benchmark with its
#      vendored Triton sources):
#        TARGET_DIR=/work/main/target/cuda bash scripts/gpu/kernels.sh prepare
#      It sources ../shared/gpu/cuda-env.sh unless CUDA_ROOT is set (source it every time, same
#      environment, or candle's kernels rebuild) and runs
#        cargo test --release --features cuda --test kernel_check --bench kernel_bench --no-run
#      (the bench built in the release profile, as `cargo bench` would).
#   2. There, with `.gpu` carried (run tool: carry [".gpu"], timeout_s 600):
#        bash scripts/gpu/kernels.sh run [--no-peer] [--bench-quick] [--no-bench] [--check-args "..."]
#      --no-peer: skip the Triton peer benchmark and ratios.txt (~3 min with a cold Triton cache);
#      --bench-quick: kernel_bench --quick --kernels-only; --no-bench: no kernel_bench;
#      --check-args: extra arguments for kernel_check (e.g. "--no-long").
#      Results under $OUT (at most 8 files come back): env.txt (card, driver, commit),
#      kernel_check.jsonl, kernel_bench.jsonl, peer.jsonl, peer_summary.txt, ratios.txt, run.log
#      (stderr of all: PASS/FAIL lines, per-case seconds, the kernels' fallback notes).
#      Exit status: kernel_check's (1 if any comparison failed, 2 without a GPU).
#   Budget (H200, 2026-11-30, before the long cases): kernel_check ~1 min, kernel_bench ~2 min,
#   peer a,b ~3 min with a cold Triton cache. The 4096/8192-token cases add the most CPU time
#   (their CPU references: 13 min on 2 cores here for the whole check, most of it Phi-2's shape
#   in bf16); pass --check-args "--budget-s S" to stop starting cases after S seconds.
set -u
cd "$(dirname "$0")/../.."
mode="${1:-run}"

if [ "$mode" = prepare ]; then
  set -e
  # shellcheck source=scripts/gpu/pack.sh
  source scripts/gpu/pack.sh
  gpu_pack "kernel_check kernel_bench engine_bench" cargo test --release --test kernel_check --bench kernel_bench --bench engine_bench
  exit 0
fi

peer=1 bench=1 bench_args="" check_args=""
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --no-peer) peer=0 ;;
    --no-bench) bench=0 ;;
    --bench-quick) bench_args="--quick --kernels-only" ;;
    --check-args) check_args="$2"; shift ;;
    *) echo "kernels.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
log="$OUT/run.log"
for b in kernel_check kernel_bench; do
  xz -dkf ".gpu/$b.xz" && chmod +x ".gpu/$b"
done
export LD_LIBRARY_PATH="$(bash .gpu/device-libpath.sh)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
{ echo "commit: $(tr '\n' ' ' < .gpu/commit.txt 2>/dev/null)"; echo "date: $(date -u +%FT%TZ)"; echo "kernels.sh run $*: peer=$peer bench=$bench bench_args=$bench_args check_args=$check_args"; } >> "$OUT/env.txt"

echo "== kernel_check" | tee -a "$log"
# shellcheck disable=SC2086
.gpu/kernel_check $check_args > "$OUT/kernel_check.jsonl" 2>> "$log"
check_rc=$?
echo "kernel_check rc=$check_rc" | tee -a "$log"
grep -c '"pass":false' "$OUT/kernel_check.jsonl" | sed 's/^/failures: /' | tee -a "$log"
grep '"summary"' "$OUT/kernel_check.jsonl" | tee -a "$log"

if [ "$bench" = 1 ]; then
  echo "== kernel_bench $bench_args" | tee -a "$log"
  # shellcheck disable=SC2086
  .gpu/kernel_bench $bench_args > "$OUT/kernel_bench.jsonl" 2>> "$log"
  echo "kernel_bench rc=$?" | tee -a "$log"
fi
if [ "$peer" = 0 ]; then
  echo "== peer skipped (--no-peer): no ratios" | tee -a "$log"
  exit $check_rc
fi

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
