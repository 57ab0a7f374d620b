#!/usr/bin/env python3
"""GPU test of hashing and capture where the weights live (run on a CUDA GPU with PyTorch).

This process holds tensors of boundary sizes (bytes and bf16, some at unaligned addresses inside
a larger allocation) and writes the manifest and the HF files for them. Then:

1. `gpu_hash_check` (an example built with the binary) compares, for every block size, the block
   hashes computed on the GPU with BLAKE3 on the host of the same bytes, and a capture of
   scattered blocks with the bytes themselves;
2. sparse and dense changes are synced with `--hash-on gpu` and the files compared byte for byte;
   the report says how much crossed PCIe;
3. a tensor rewritten without pause while a sync runs: the sync either copies it consistently
   (every block's copy is what the block holds when the copy is done; verify is clean) or stops
   with exit 75 (it kept changing) and writes nothing; once the writer stops, the next sync
   takes it. (The retry logic itself is unit-tested with a simulated writer in src/live/gpu.rs.)

Prints a pass/fail summary; exits non-zero on failure; skips (exit 77, saying so) without
PyTorch or a GPU.

Usage: scripts/gpu_hash_test.py PATH/TO/apollo-checkpoint PATH/TO/gpu_hash_check
"""

import json
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    binary, checker = sys.argv[1], sys.argv[2]
    torch = gpu_checks.cuda_torch()
    if torch is None:
        return gpu_checks.SKIP
    import vllm_export_hook as hook
    from gpu_sync_test import read_safetensors, write_safetensors

    checks = gpu_checks.Checks()
    ok = checks.ok
    torch.manual_seed(3)
    live = {}
    sizes = [1, 63, 64, 65, 1023, 1024, 1025, 4095, 4096, 4097, 16383, 16385, (1 << 20) + 3, (24 << 20) + 5]
    for n in sizes:
        live[f"bytes.{n}"] = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    blob = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, device="cuda")
    for shift in (1, 2, 3):
        live[f"unaligned.{shift}"] = blob[shift:shift + (1 << 20) + 777]
    live["bf16.matrix"] = (torch.randn(3000, 1000, device="cuda") * 0.02).to(torch.bfloat16)
    live["bf16.big"] = (torch.randn(64 << 20, device="cuda") * 0.02).to(torch.bfloat16)

    def view():
        return {k: v.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() for k, v in live.items()}

    def run(*args):
        r = subprocess.run([binary, *args], capture_output=True, text=True)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}), r.stderr

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_safetensors(os.path.join(model, "model.safetensors"),
                          {k: v.cpu() for k, v in live.items()})
        manifest = os.path.join(tmp, "handles.json")
        hook.write_manifest(manifest, list(live.items()), meta={"export_id": "t"})

        r = subprocess.run([checker, model, manifest], capture_output=True, text=True)
        print(r.stdout, end="")
        ok("gpu_hash_check: GPU block hashes and captures equal the host's", r.returncode == 0, r.stderr[-2000:])

        code, _, err = run("init", "--model-dir", model)
        ok("init", code == 0, err)
        for what, step in [("sparse", 2048 * 200), ("dense", 2048)]:
            with torch.no_grad():
                for k, t in live.items():
                    if t.dtype == torch.bfloat16:
                        t.view(-1)[::step] += 0.01
                    else:
                        t.view(-1)[::step * 2] += 1
            torch.cuda.synchronize()
            code, rep, err = run("sync", "--model-dir", model, "--handles", manifest, "--hash-on", "gpu", "--json")
            ok(f"{what}: sync --hash-on gpu", code == 0 and rep.get("changed"), err)
            got = read_safetensors(os.path.join(model, "model.safetensors"))
            ok(f"{what}: files equal the live weights byte for byte", got == view())
            ok(f"{what}: changed blocks crossed PCIe in few copies ({rep.get('gpu_bytes_copied')} bytes, "
               f"{rep.get('gpu_copies')} copies, {rep.get('blocks_changed')} blocks)",
               rep.get("gpu_copies", 0) > 0 and rep.get("gpu_copies", 1 << 40) < max(8, rep.get("blocks_changed", 0)),
               json.dumps(rep)[:500])
            print(f"  {what}: {json.dumps({k: rep.get(k) for k in ('seconds', 'phases', 'gpu_bytes_copied', 'gpu_copies', 'blocks_changed', 'source')})}")
        code, _, err = run("verify", "--model-dir", model)
        ok("verify clean", code == 0, err)

        # A tensor rewritten without pause: no stable capture.
        target = live["bf16.big"]
        stop = threading.Event()

        def writer():
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.no_grad():
                while not stop.is_set():
                    for _ in range(20):
                        target.add_(0.001)
                    stream.synchronize()

        before = open(os.path.join(model, "model.safetensors"), "rb").read()
        th = threading.Thread(target=writer)
        th.start()
        try:
            code, _, err = run("sync", "--model-dir", model, "--handles", manifest, "--hash-on", "gpu")
        finally:
            stop.set()
            th.join()
        torch.cuda.synchronize()
        # Contexts of two processes share the GPU by time slices, so the sync may find the
        # tensor still within its slices (then its copy is consistent: verify is clean) or see
        # it move under every attempt (then exit 75 and nothing written). Never a mix.
        after = open(os.path.join(model, "model.safetensors"), "rb").read()
        if code == 75:
            ok("a tensor rewritten without pause: exit 75, saying so", "kept changing" in err, err)
            ok("and nothing is written", after == before)
        else:
            ok(f"a tensor rewritten without pause: a consistent copy (exit {code})", code == 0, err)
            vcode, _, verr = run("verify", "--model-dir", model)
            ok("and the files are what the index says", vcode == 0, verr)
        print(f"  writer running during the sync: exit {code}")
        code, _, err = run("sync", "--model-dir", model, "--handles", manifest, "--hash-on", "gpu")
        got = read_safetensors(os.path.join(model, "model.safetensors"))
        ok("once it stops, the next sync takes it", code == 0 and got == view(), err)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
