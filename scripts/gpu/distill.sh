#!/usr/bin/env bash
# Issue 17 on the GPU machine: our full-size distillation step (benches/distill_bench.rs: random
# 3.1B teacher -> its 0.25 hybrid, batch 1/4/8 x 828 tokens, with and without gradient
# checkpointing) and the PyTorch + Triton peer (../shared/peer section e, the same step as
# upstream trains it) in ONE call, so every ratio comes from one card; and the lazy LLaVA
# loader's samples/s (benches/loader_bench.rs) on 2 and on 16 cores.
#
# Here (build and pack what travels into the git-ignored .gpu/):
#   TARGET_DIR=/work/main/target/cuda bash scripts/gpu/distill.sh prepare
# It sources ../shared/gpu/cuda-env.sh unless CUDA_ROOT is set, runs
#   cargo bench --features cuda --bench distill_bench --bench loader_bench --no-run
# and packs both executables (stripped, xz'd), the commit, the loader path helper and the peer
# (with its vendored Triton sources) into .gpu/.
# There (run tool: carry [".gpu"], timeout_s 600):
#   bash scripts/gpu/distill.sh run [distill_bench options]   # ours + peer e, ~6-8 min
#   bash scripts/gpu/distill.sh ours [distill_bench options]  # ours only
#   bash scripts/gpu/distill.sh peer                           # peer e only (batches 1,4,8)
#   bash scripts/gpu/distill.sh loader                         # loader_bench at 2 and 16 workers
# Results under $OUT: distill.jsonl (ours), peer.jsonl + peer_summary.txt, compare.txt (ours vs
# peer per batch: tokens/s, peak memory, MFU on the same FLOP count), loader.jsonl, env.txt,
# run.log.
set -u
cd "$(dirname "$0")/../.."
mode="${1:-run}"
shift || true

if [ "$mode" = prepare ]; then
  set -e
  # shellcheck source=scripts/gpu/pack.sh
  source scripts/gpu/pack.sh
  gpu_pack "distill_bench loader_bench" cargo bench --bench distill_bench --bench loader_bench
  exit 0
fi

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
log="$OUT/run.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc
  echo "commit: $(tr '\n' ' ' < .gpu/commit.txt 2>/dev/null)"; echo "date: $(date -u +%FT%TZ)"
  echo "distill.sh $mode $*"; } >> "$OUT/env.txt" 2>&1
export LD_LIBRARY_PATH="$(bash .gpu/device-libpath.sh)"

ours() {
  xz -dkf .gpu/distill_bench.xz && chmod +x .gpu/distill_bench
  echo "== distill_bench $*" | tee -a "$log"
  .gpu/distill_bench --out "$OUT/distill.jsonl" "$@" > /dev/null 2>> "$log"
  local rc=$?
  echo "distill_bench rc=$rc" | tee -a "$log"
  grep '"record":"step"' "$OUT/distill.jsonl" | tee -a "$log"
  return $rc
}

peer() {
  echo "== peer section e" | tee -a "$log"
  local peer_out
  peer_out=$(mktemp -d)
  OUT="$peer_out" bash .gpu/peer/run_peer.sh --sections e --distill-batches 1,4,8 >> "$log" 2>&1
  local rc=$?
  echo "peer rc=$rc" | tee -a "$log"
  cp "$peer_out/peer.jsonl" "$OUT/peer.jsonl" 2>/dev/null
  cp "$peer_out/summary.txt" "$OUT/peer_summary.txt" 2>/dev/null
  tail -n 5 "$peer_out/peer.stderr" >> "$log" 2>/dev/null
  return $rc
}

compare() {
  # Per batch: ours (each checkpoint setting) against the peer, on our FLOP count for both.
  python3 - "$OUT/distill.jsonl" "$OUT/peer.jsonl" <<'PY' | tee "$OUT/compare.txt"
import json, sys
def load(p):
    try:
        return [json.loads(l) for l in open(p) if l.strip().startswith("{")]
    except OSError:
        return []
ours, peer = load(sys.argv[1]), load(sys.argv[2])
PEAK = 989e12
print(f"{'batch':>5} {'ckpt':>5} {'ours ms':>9} {'ours tok/s':>11} {'ours GiB':>9} {'ours MFU':>9} "
      f"{'peer ms':>9} {'peer tok/s':>11} {'peer GiB':>9} {'peer MFU':>9} {'speed':>6} {'mem':>6}")
for r in ours:
    if r.get("record") != "step":
        continue
    p = next((x for x in peer if x.get("section") == "e" and x.get("name") == "distill_step"
              and x.get("batch") == r["batch"] and "ms_median" in x), None)
    if "error" in r:
        print(f"{r['batch']:>5} {str(r['checkpoint']):>5} error: {r['error'][:80]}")
        continue
    gib = (r.get("peak_bytes") or 0) / 2**30
    line = (f"{r['batch']:>5} {str(r['checkpoint']):>5} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.1f} "
            f"{gib:>9.2f} {100 * r['mfu']:>8.1f}%")
    if p:
        ps = p["ms_median"] / 1e3
        pmfu = r["model_flops"] / ps / PEAK
        line += (f" {p['ms_median']:>9.1f} {p['tokens_per_s']:>11.1f} {p['peak_mem_gib']:>9.2f} "
                 f"{100 * pmfu:>8.1f}% {r['tokens_per_s'] / p['tokens_per_s']:>5.2f}x "
                 f"{gib / p['peak_mem_gib']:>5.2f}x")
    else:
        err = next((x.get("error", "") for x in peer if x.get("section") == "e" and x.get("batch") == r["batch"]), "")
        line += f"   peer: {'error ' + err[:60] if err else 'no record'}"
    print(line)
print("speed = our tokens/s / peer tokens/s (target >= 1.5); mem = our peak / peer peak (target <= 1)")
PY
}

case "$mode" in
  run)
    ours "$@"; rc=$?
    peer
    compare
    exit $rc
    ;;
  ours) ours "$@"; rc=$?; exit $rc ;;
  peer) peer; rc=$?; compare; exit $rc ;;
  loader)
    xz -dkf .gpu/loader_bench.xz && chmod +x .gpu/loader_bench
    echo "== loader_bench" | tee -a "$log"
    # The tokenizer travels with the working tree (assets/); the data set is generated once.
    # First pinned to 2 cores (a 2-core machine), then on all of them.
    data=$(mktemp -d)
    common=(--records 512 --batches 48 --dir "$data" --tokenizer assets/tiny-teacher/tokenizer.json)
    echo "-- 2 cores (taskset -c 0,1)" | tee -a "$log"
    taskset -c 0,1 .gpu/loader_bench "${common[@]}" --workers 1,2 --out "$OUT/loader.jsonl" 2>> "$log"
    rc=$?
    echo "-- all $(nproc) cores" | tee -a "$log"
    .gpu/loader_bench "${common[@]}" --workers 2,4,8,16 --out "$OUT/loader.jsonl" 2>> "$log" || rc=$?
    cat "$OUT/loader.jsonl" | tee -a "$log"
    echo "loader_bench rc=$rc" | tee -a "$log"
    exit $rc
    ;;
  *) echo "distill.sh: prepare, run, ours, peer or loader, not $mode" >&2; exit 2 ;;
esac
