#!/usr/bin/env bash
# The generation engine on the GPU machine: engine_bench (benches/engine_bench.rs: our teacher and
# hybrids at full size with random weights) and, in the same call or the next one while the
# machine stays warm, the peers users run today (../shared/peer sections c and d: HF transformers'
# Phi-2 teacher, the PyTorch MaTVLM hybrid on mamba_ssm's Triton kernels), so every ratio comes
# from one card.
#
# Here: `TARGET_DIR=/work/main/target/cuda bash scripts/gpu/kernels.sh prepare` packs engine_bench
# with the kernel programs and the peer into .gpu/. There (run tool, carry [".gpu"]):
#   bash scripts/gpu/engine.sh ours  [engine_bench options]   # ~2-4 min
#   bash scripts/gpu/engine.sh peers [bench_peer.py options]  # ~4-5 min
# Results under $OUT: engine.jsonl (ours), peer.jsonl + peer_summary.txt, env.txt, run.log.
set -u
cd "$(dirname "$0")/../.."
what="${1:-ours}"
shift || true
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
log="$OUT/run.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "commit: $(tr '\n' ' ' < .gpu/commit.txt 2>/dev/null)"; echo "date: $(date -u +%FT%TZ)"
  echo "engine.sh $what $*"; } >> "$OUT/env.txt" 2>&1

case "$what" in
  ours)
    xz -dkf .gpu/engine_bench.xz && chmod +x .gpu/engine_bench
    export LD_LIBRARY_PATH="$(bash .gpu/device-libpath.sh)"
    echo "== engine_bench $*" | tee -a "$log"
    .gpu/engine_bench --check-model assets/tiny-teacher --out "$OUT/engine.jsonl" "$@" \
        > /dev/null 2>> "$log"
    rc=$?
    echo "engine_bench rc=$rc" | tee -a "$log"
    grep -E '"record":"(check|env)"' "$OUT/engine.jsonl" | tee -a "$log"
    python3 - "$OUT/engine.jsonl" <<'PY' | tee -a "$log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r.get("record") == "decode":
        print(f"{r['model']:>8} b{r['batch']:<3} N{r['gen_len']:<5} {r['tokens_per_s']:9.1f} tok/s "
              f"{r['ms_per_token']:7.2f} ms/tok  {100 * r['fraction_of_bound']:5.1f}% of bound  "
              f"peak {(r['peak_bytes'] or 0) / 2**30:6.2f} GiB (lm {(r['lm_peak_bytes'] or 0) / 2**30:6.2f})")
    elif r.get("record") == "prefill":
        print(f"{r['model']:>8} b{r['batch']:<3} prefill {r['ms']:8.2f} ms  peak {(r['peak_bytes'] or 0) / 2**30:6.2f} GiB")
PY
    exit $rc
    ;;
  peers)
    echo "== peer sections c,d $*" | tee -a "$log"
    peer_out=$(mktemp -d)
    OUT="$peer_out" bash .gpu/peer/run_peer.sh --sections c,d "$@" >> "$log" 2>&1
    rc=$?
    echo "peer rc=$rc" | tee -a "$log"
    cp "$peer_out/peer.jsonl" "$OUT/peer.jsonl" 2>/dev/null
    cp "$peer_out/summary.txt" "$OUT/peer_summary.txt" 2>/dev/null
    tail -n 40 "$OUT/peer_summary.txt" 2>/dev/null
    exit $rc
    ;;
  *) echo "engine.sh: ours or peers, not $what" >&2; exit 2 ;;
esac
