#!/usr/bin/env python3
"""Our SSD scan kernels beside mamba_ssm's Triton, kernel against kernel, from one
`scripts/gpu/kernels.sh run` output folder (kernel_bench.jsonl and the peer's peer.jsonl).

Triton's forward is taken from its CUDA-graph replay (`scan_fwd_cudagraph`: no Python launch
cost); its forward + backward has no graph record, so that column is Python-launched and is
kernel-bound only where its times grow with the work (batch 8, L >= 4096).

    python3 scripts/gpu/kernel_vs_kernel.py DIR > DIR/kernel_vs_kernel.txt
"""
import json
import sys

d = sys.argv[1].rstrip("/") + "/"
ours = [json.loads(l) for l in open(d + "kernel_bench.jsonl") if l.startswith("{")]
peer = [json.loads(l) for l in open(d + "peer.jsonl") if l.startswith("{")]


def find(name, b, L, z):
    for p in peer:
        if (p.get("section") == "a" and p.get("name") == name and p.get("batch") == b
                and p.get("seqlen") == L and p.get("with_z") == z and "ms_median" in p):
            return p["ms_median"]
    return None


print("SSD scan, Phi-2 mixer shape (32 heads x 80, d_state 80, 32 groups, chunk 256), bf16.")
print("ours: kernel_bench (impl=kernel); Triton forward: mamba_chunk_scan_combined replayed from a CUDA graph")
print("(scan_fwd_cudagraph: no Python launch cost); Triton forward+backward: Python-launched (no graph).")
print("ratio = Triton ms / ours ms (> 1: ours faster).")
print(f"{'what':<26}{'ours ms':>9}{'triton graph ms':>16}{'ratio':>7}{'triton py ms':>13}{'ratio':>7}")
for r in ours:
    if r.get("impl") != "kernel" or r.get("name") not in ("scan_fwd", "scan_fwd_bwd"):
        continue
    b, L, z = r["batch"], r["seqlen"], r.get("with_z", False)
    ms = r.get("ms_median")
    if not ms:
        continue
    if r["name"] == "scan_fwd":
        g, py = find("scan_fwd_cudagraph", b, L, z), find("scan_fwd", b, L, z)
        if g is None or py is None:
            continue
        print(f"{'fwd b%d L%d z=%d' % (b, L, z):<26}{ms:>9.4f}{g:>16.4f}{g / ms:>7.2f}{py:>13.4f}{py / ms:>7.2f}")
    else:
        py = find("scan_fwd_bwd", b, L, z)
        if py is None:
            continue
        print(f"{'fwd+bwd b%d L%d z=%d' % (b, L, z):<26}{ms:>9.4f}{'-':>16}{'-':>7}{py:>13.4f}{py / ms:>7.2f}")
