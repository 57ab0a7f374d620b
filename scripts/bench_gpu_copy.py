#!/usr/bin/env python3
"""How fast live weights come off the GPU (run on a GPU host with PyTorch).

This process plays the engine: it holds SIZE_GIB of bf16 tensors on GPU 0 (256 MiB each) and
writes their manifest with the export hook. Then:
  1. examples/ipc_read reads every tensor through CUDA IPC on all cores, with 1 and 4 pinned
     staging buffers, or the counts in $STAGING_BUFFERS (raw copy throughput; pinned device->host is about 51 GiB/s on an H200);
  2. the same weights are written as safetensors files (SYNC_GIB of them), indexed, and a
     `sync --handles` that finds nothing changed is timed (copy + hash of every live byte).
Prints one JSON object. Exits 77 (skip) without PyTorch or a GPU.

Usage: [STAGING_BUFFERS="1 4"] scripts/bench_gpu_copy.py BIN_DIR [SIZE_GIB] [SYNC_GIB]
  BIN_DIR holds apollo-checkpoint and ipc_read (target/release and target/release/examples).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    bindir = sys.argv[1]
    size_gib = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    sync_gib = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    torch = gpu_checks.cuda_torch()
    if torch is None:
        return gpu_checks.SKIP
    import vllm_export_hook as hook
    from gpu_sync_test import write_safetensors

    n = size_gib * 4
    live = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8192, 16384, device="cuda").to(torch.bfloat16)
            for i in range(n)}
    torch.cuda.synchronize()
    out = {"gpu": torch.cuda.get_device_name(0), "live_gib": size_gib}
    with tempfile.TemporaryDirectory() as work:
        manifest = os.path.join(work, "handles.json")
        hook.write_manifest(manifest, live.items(), meta={"tp_rank": 0})
        counts = os.environ.get("STAGING_BUFFERS", "1 4").split()
        r = subprocess.run([os.path.join(bindir, "ipc_read"), manifest, *counts], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr)
            return 1
        out["ipc_read"] = [json.loads(line) for line in r.stdout.splitlines()]
        # A model of sync_gib on disk, equal to the first tensors.
        model = os.path.join(work, "model")
        os.makedirs(model)
        names = sorted(live)[: sync_gib * 4]
        for k in range(0, len(names), 8):
            part = {nm: live[nm].cpu() for nm in names[k:k + 8]}
            write_safetensors(os.path.join(model, f"model-{k // 8:05d}.safetensors"), part)
        index = {"metadata": {}, "weight_map": {nm: f"model-{k // 8:05d}.safetensors" for k in range(0, len(names), 8) for nm in names[k:k + 8]}}
        with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
        sub = os.path.join(work, "sub.json")
        hook.write_manifest(sub, [(nm, live[nm]) for nm in names], meta={"tp_rank": 0})
        binary = os.path.join(bindir, "apollo-checkpoint")
        t = time.perf_counter()
        subprocess.run([binary, "init", "--model-dir", model], check=True, capture_output=True)
        out["init_s"] = round(time.perf_counter() - t, 3)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", sub, "--json"], check=True, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            assert not json.loads(r.stdout)["changed"], r.stdout
        med = statistics.median(times)
        out["no_change_sync_handles"] = {"gib": sync_gib, "median_s": round(med, 3), "gib_per_s": round(sync_gib / med, 2)}
        out["cpus"] = os.cpu_count()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
