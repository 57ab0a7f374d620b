#!/usr/bin/env python3
"""Benchmark export-delta + apply-delta against rsync's delta transfer, same machine, same files.

Makes a synthetic Qwen3.5-shaped model (default 2 GiB), a replica copy of it (with its own index)
and an rsync copy of it. Then for each scenario it changes the live weights, syncs the model, and
brings both copies up to date:

  sparse  three sparse syncs (one bf16 element in 0.5% of 4 KiB blocks each), then one delta
  dense   one dense sync (1% of bf16 elements in every tensor), then one delta

ours:  apollo-checkpoint export-delta + apply-delta; bytes shipped = the delta file + manifest
rsync: rsync -I --inplace --no-whole-file --stats model/ copy/; bytes shipped = "Total bytes sent".
       rsync does not fsync; apply-delta makes every write durable, so the time of rsync followed
       by `sync FILE...` on the files it wrote is reported too.

Each scenario runs --runs times on fresh copies; medians are printed as one JSON object on stdout
with the targets (delta <= 1% of rsync's bytes for sparse, <= 6% of the model for dense; >= 20x
faster end to end). Files are in page cache for both tools.

Usage: scripts/bench_delta.py [--size BYTES] [--runs N] [--dir DIR] [--keep] [--bin-dir DIR]
  --bin-dir: use apollo-checkpoint and synth from DIR instead of building them (another machine)
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed(cmd, **kw):
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return time.perf_counter() - start, out.stdout


def copy_model(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2 << 30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--bin-dir")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        sys.exit("bench_delta: rsync is not installed (apt-get install rsync)")
    if args.bin_dir:
        binary, synth = str(Path(args.bin_dir) / "apollo-checkpoint"), str(Path(args.bin_dir) / "synth")
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "apollo-checkpoint", "--example", "synth"],
                       cwd=ROOT, check=True)
        binary, synth = str(ROOT / "target/release/apollo-checkpoint"), str(ROOT / "target/release/examples/synth")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="apollo-bench-delta-"))
    try:
        results = {}
        for scenario, changes in [("sparse", ["sparse"] * 3), ("dense", ["dense"])]:
            runs = []
            for run in range(args.runs):
                shutil.rmtree(work, ignore_errors=True)
                model, live, replica, rcopy, outbox = (work / n for n in ["model", "live", "replica", "rsync-copy", "outbox"])
                subprocess.run([synth, "generate", str(model), str(args.size), str(512 << 20), "1"], check=True)
                shutil.copytree(model, live)
                subprocess.run([binary, "init", "--model-dir", str(model)], check=True, stderr=subprocess.DEVNULL)
                # The replica starts from a full delta, so it has its own index; the rsync copy is cp.
                subprocess.run([binary, "export-delta", "--model-dir", str(model), "--out", str(outbox), "--full"],
                               check=True, stderr=subprocess.DEVNULL)
                subprocess.run([binary, "apply-delta", "--replica-dir", str(replica), *map(str, outbox.glob("*.apd"))],
                               check=True, stderr=subprocess.DEVNULL)
                for f in outbox.iterdir():
                    f.unlink()
                copy_model(model, rcopy)
                model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
                for i, change in enumerate(changes):
                    subprocess.run([synth, "mutate", str(live), change, str(1000 * run + i)], check=True,
                                   stdout=subprocess.DEVNULL)
                    subprocess.run([binary, "sync", "--model-dir", str(model), "--from", str(live)], check=True,
                                   stderr=subprocess.DEVNULL)
                # Let the kernel finish writing back the copies made above (2 GiB not yet
                # synced would otherwise compete with whichever tool runs first), then warm the
                # page cache for both tools.
                os.sync()
                for d in (model, replica, rcopy):
                    for f in d.glob("*.safetensors"):
                        with open(f, "rb") as fh:
                            while fh.read(1 << 24):
                                pass
                t_export, out = timed([binary, "export-delta", "--model-dir", str(model), "--out", str(outbox), "--json"])
                export = json.loads(out)
                shipped = sum(f.stat().st_size for f in outbox.iterdir() if f.is_file())
                t_apply, _ = timed([binary, "apply-delta", "--replica-dir", str(replica), str(export["file"])])
                t_rsync, out = timed(["rsync", "-I", "--inplace", "--no-whole-file", "--stats", "-r",
                                      "--include", "*.safetensors", "--exclude", "*", f"{model}/", f"{rcopy}/"])
                sent = int(re.search(r"Total bytes sent: ([\d,.]+)", out).group(1).replace(",", "").replace(".", ""))
                # rsync does not fsync what it wrote; apply-delta does. Also time making rsync's
                # copy durable, for a like-for-like comparison.
                t_fsync, _ = timed(["sync", *map(str, rcopy.glob("*.safetensors"))])
                same = all((replica / f.name).read_bytes() == f.read_bytes() for f in model.glob("*.safetensors"))
                assert same, "the replica differs from the model"
                runs.append({"export_s": t_export, "apply_s": t_apply, "ours_s": t_export + t_apply, "ours_bytes": shipped,
                             "delta_bytes": export["bytes"], "rsync_s": t_rsync, "rsync_then_fsync_s": t_rsync + t_fsync, "rsync_bytes": sent, "model_bytes": model_bytes})
                log(f"{scenario} run {run}: ours {shipped} B in {t_export + t_apply:.3f} s; rsync {sent} B in {t_rsync:.3f} s")
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            res = {k: round(v, 4) if isinstance(v, float) else int(v) for k, v in med.items()}
            res["bytes_vs_rsync"] = round(med["ours_bytes"] / med["rsync_bytes"], 5)
            res["bytes_vs_model"] = round(med["ours_bytes"] / med["model_bytes"], 5)
            res["speedup_vs_rsync"] = round(med["rsync_s"] / med["ours_s"], 1)
            res["speedup_vs_rsync_then_fsync"] = round(med["rsync_then_fsync_s"] / med["ours_s"], 1)
            if scenario == "sparse":
                res["meets_bytes_target"] = res["bytes_vs_rsync"] <= 0.01
            else:
                res["meets_bytes_target"] = res["bytes_vs_model"] <= 0.06
            res["meets_speed_target"] = res["speedup_vs_rsync"] >= 20
            results[scenario] = res
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "runs": args.runs,
            "scenarios": results,
        }, indent=2))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
