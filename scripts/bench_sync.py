#!/usr/bin/env python3
"""Benchmark `apollo-checkpoint sync --from` against b3sum on the same files, in the same run.

Makes a synthetic Qwen3.5-shaped model (default 2 GiB, bf16 matrices of the real shapes scaled
down), copies it as the "live" source, indexes it, then times sync for four kinds of change:

  nothing  the source equals the model
  sparse   one bf16 element changed in 0.5% of 4 KiB blocks
  dense    1% of bf16 elements changed, spread over every tensor
  whole    the largest tensor replaced

Each scenario runs --runs times (a fresh change each time) and reports the median wall time of
the whole `apollo-checkpoint` process. The floor is `b3sum` hashing the same files sync hashes
(the live source's), files in page cache, timed right before each sync in the same run: the
page-cache state of a file (how it was last written) changes how fast any mmap reader can hash
it, so both are measured on the same files in the same state. The medians of the sync phases
are reported too; `flush` (fsync of the pages the previous sync left to the page cache, at the
start of this one) is disk time, not hashing.
Each changed sync also reports its journal's size against the targets: sparse <= 5% of the changed
blocks' bytes, dense <= 6% of the model. Prints one JSON object on stdout; progress on stderr.

Usage: scripts/bench_sync.py [--size BYTES] [--runs N] [--dir DIR] [--keep]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"nothing": 2.0, "sparse": 3.0}  # max ratio to b3sum on a 2-core machine
# Journal size targets: sparse <= 5% of the changed blocks' bytes, dense <= 6% of the model.
JOURNAL_TARGETS = {"sparse": ("journal_vs_changed_blocks", 0.05), "dense": ("journal_vs_model", 0.06)}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "apollo-checkpoint", "--example", "synth"],
                   cwd=ROOT, check=True)
    return ROOT / "target/release/apollo-checkpoint", ROOT / "target/release/examples/synth"


def find_b3sum():
    found = shutil.which("b3sum")
    if found:
        return found
    local = ROOT / "target/tools/bin/b3sum"
    if not local.exists():
        log("b3sum not found: installing it from crates.io into target/tools")
        subprocess.run(["cargo", "install", "--quiet", "--locked", "b3sum", "--root", str(ROOT / "target/tools")],
                       check=True)
    return str(local)


def timed(cmd):
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - start, out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2 << 30, help="model bytes (default 2 GiB)")
    ap.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    ap.add_argument("--dir", help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    binary, synth = build()
    b3sum = find_b3sum()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="apollo-bench-"))
    model, live = work / "model", work / "live"
    try:
        for d in (model, live):
            shutil.rmtree(d, ignore_errors=True)
        log(f"generating a {args.size / 2**30:.2f} GiB model in {model}")
        subprocess.run([str(synth), "generate", str(model), str(args.size), str(512 << 20), "1"], check=True)
        shutil.copytree(model, live)
        files = sorted(str(p) for p in model.glob("*.safetensors"))
        model_bytes = sum(os.path.getsize(f) for f in files)

        init_s, _ = timed([str(binary), "init", "--model-dir", str(model), "--json"])
        log(f"init: {init_s:.3f} s")

        live_files = sorted(str(p) for p in live.glob("*.safetensors"))
        subprocess.run([b3sum, *files, *live_files], check=True, stdout=subprocess.DEVNULL)  # warm the cache
        b3_model = statistics.median([timed([b3sum, *files])[0] for _ in range(args.runs)])
        log(f"b3sum of the model files: median {b3_model:.3f} s")

        results = {}
        seed = 100
        for scenario in ["nothing", "sparse", "dense", "whole"]:
            walls, inner, reports, floors = [], [], [], []
            for _ in range(args.runs):
                if scenario != "nothing":
                    seed += 1
                    subprocess.run([str(synth), "mutate", str(live), scenario, str(seed)], check=True,
                                   stdout=subprocess.DEVNULL)
                floors.append(timed([b3sum, *live_files])[0])
                wall, out = timed([str(binary), "sync", "--model-dir", str(model), "--from", str(live), "--json"])
                report = json.loads(out)
                walls.append(wall)
                inner.append(report["seconds"])
                reports.append(report)
            med = statistics.median(walls)
            b3_med = statistics.median(floors)
            last = reports[-1]
            phases = {k: round(statistics.median(r["phases"][k] for r in reports), 4) for k in last["phases"]}
            results[scenario] = {
                "median_s": round(med, 4),
                "runs_s": [round(w, 4) for w in walls],
                "b3sum_median_s": round(b3_med, 4),
                "b3sum_runs_s": [round(w, 4) for w in floors],
                "ratio_vs_b3sum": round(med / b3_med, 3),
                "ratio_vs_b3sum_without_flush": round((med - phases["flush"]) / b3_med, 3),
                "median_inner_s": round(statistics.median(inner), 4),
                "median_phases_s": phases,
                "blocks_changed": last["blocks_changed"],
                "bytes_changed": last["bytes_changed"],
                "bytes_differing": last["bytes_differing"],
                "model_bytes_read": last["model_bytes_read"],
                "journal_bytes": last["journal_bytes"],
                "journal_vs_changed_blocks": round(last["journal_bytes"] / max(last["bytes_changed"], 1), 4),
                "journal_vs_model": round(last["journal_bytes"] / model_bytes, 4),
                "gib_per_s": round(model_bytes / med / 2**30, 2),
            }
            if scenario in JOURNAL_TARGETS:
                key, limit = JOURNAL_TARGETS[scenario]
                results[scenario]["journal_target"] = {key: limit}
                results[scenario]["journal_meets_target"] = results[scenario][key] <= limit
            if scenario in TARGETS:
                results[scenario]["target_ratio"] = TARGETS[scenario]
                results[scenario]["meets_target"] = med / b3_med <= TARGETS[scenario]
            log(f"{scenario}: median {med:.3f} s ({med / b3_med:.2f}x b3sum), {last['blocks_changed']} blocks changed,"
                f" journal {last['journal_bytes']} bytes")

        verify_s, _ = timed([str(binary), "verify", "--model-dir", str(model), "--json"])
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
            "model_bytes": model_bytes,
            "files": len(files),
            "runs": args.runs,
            "init_s": round(init_s, 4),
            "verify_s": round(verify_s, 4),
            "b3sum_model_files_median_s": round(b3_model, 4),
            "scenarios": results,
        }, indent=2))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
