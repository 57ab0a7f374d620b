#!/usr/bin/env python3
"""GPU end-to-end test of `sync --handles` (run on a machine with a CUDA GPU and PyTorch).

This process plays the serving engine: it holds a small Qwen3.5-shaped model on the GPU in vLLM's
packed layout (qkv_proj = [q; k; v], gate_up_proj = [gate; up], in_proj_qkvz = [qkv; z],
in_proj_ba = [b; a]) and writes a manifest with the export hook, with the layout facts vLLM's
modules would give. It writes the HF files, runs `apollo-checkpoint init`, then for several rounds
changes the live weights in place and runs `apollo-checkpoint sync --handles`, checking after each
that the files equal the HF view of the live weights byte for byte. Finally a manifest from a
producer that has exited, one naming a GPU this machine does not have and one with handles that
are not CUDA's must each give a clear error and write nothing. Prints a pass/fail summary; exits non-zero on
failure; skips (exit 77, saying so) without PyTorch or a GPU.

Usage: scripts/gpu_sync_test.py PATH/TO/apollo-checkpoint
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402

ST = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.uint8": "U8"}


def write_safetensors(path, tensors):
    """A minimal safetensors writer (name -> CPU tensor), tensors in name order."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        b = t.view(-1).view(__import__("torch").uint8).numpy().tobytes()
        header[name] = {"dtype": ST[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return {k: data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    torch = gpu_checks.cuda_torch()
    if torch is None:
        return gpu_checks.SKIP
    import vllm_export_hook as hook

    checks = gpu_checks.Checks()
    ok = checks.ok

    torch.manual_seed(1)
    h, inter = 256, 512
    qd, kd, vd = 2 * 4 * 32, 1 * 32, 1 * 32  # gated q: 4 heads of 32, twice
    kk, vv, nv = 64, 96, 6  # GDN key dim, value dim, value heads
    dev = "cuda"

    def rnd(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape, device=dev) * 0.02).to(dtype)

    # Live parameters in vLLM's layout, and how each maps back to HF tensors.
    live, facts = {}, {}
    p = "language_model.model.layers"
    for i in range(2):
        full = i == 1
        if full:
            live[f"{p}.{i}.self_attn.qkv_proj.weight"] = rnd(qd + kd + vd, h)
            facts[f"{p}.{i}.self_attn.qkv_proj.weight"] = ("qkv_proj", [("q_proj", qd), ("k_proj", kd), ("v_proj", vd)])
            live[f"{p}.{i}.self_attn.o_proj.weight"] = rnd(h, qd // 2)
        else:
            live[f"{p}.{i}.linear_attn.in_proj_qkvz.weight"] = rnd(2 * kk + vv + vv, h)
            facts[f"{p}.{i}.linear_attn.in_proj_qkvz.weight"] = ("in_proj_qkvz", [("in_proj_qkv", 2 * kk + vv), ("in_proj_z", vv)])
            live[f"{p}.{i}.linear_attn.in_proj_ba.weight"] = rnd(2 * nv, h)
            facts[f"{p}.{i}.linear_attn.in_proj_ba.weight"] = ("in_proj_ba", [("in_proj_b", nv), ("in_proj_a", nv)])
            live[f"{p}.{i}.linear_attn.A_log"] = rnd(nv, dtype=torch.float32)
            live[f"{p}.{i}.linear_attn.out_proj.weight"] = rnd(h, vv)
        live[f"{p}.{i}.mlp.gate_up_proj.weight"] = rnd(2 * inter, h)
        facts[f"{p}.{i}.mlp.gate_up_proj.weight"] = ("gate_up_proj", [("gate_proj", inter), ("up_proj", inter)])
        live[f"{p}.{i}.mlp.down_proj.weight"] = rnd(h, inter)
        live[f"{p}.{i}.input_layernorm.weight"] = rnd(h)
    live["language_model.model.embed_tokens.weight"] = rnd(1024, h)
    live["language_model.lm_head.weight"] = rnd(1024, h)

    def hf_name(n):
        for a, b in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]:
            if n.startswith(a):
                return b + n[len(a):]
        return n

    def hf_view():
        """The HF tensors of the live weights, as CPU copies."""
        out = {}
        for n, t in live.items():
            if n in facts:
                packed, parts = facts[n]
                row = 0
                for part, rows in parts:
                    out[hf_name(n.replace(packed, part))] = t[row:row + rows].cpu()
                    row += rows
            else:
                out[hf_name(n)] = t.cpu()
        return out

    layouts = {}
    for n, (packed, parts) in facts.items():
        layouts[n] = {"tp_rank": 0, "tp_size": 1, "shard_dim": None, "packed": packed,
                      "parts": [{"name": part, "rows": r, "local_rows": r, "first_row": 0} for part, r in parts]}

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_safetensors(os.path.join(model, "model.safetensors"), hf_view())
        manifest = os.path.join(tmp, "handles-rank0.json")
        hook.write_manifest(manifest, list(live.items()), meta={"rank": 0}, layouts=layouts)
        r = subprocess.run([binary, "init", "--model-dir", model], capture_output=True, text=True)
        ok("init", r.returncode == 0, r.stderr)
        r = subprocess.run([binary, "diagnose", "--model-dir", model, "--handles", manifest, "--json"], capture_output=True, text=True)
        d = json.loads(r.stdout) if r.returncode == 0 else {}
        ok("diagnose: every HF tensor matched", r.returncode == 0 and not d["live_only"] and not d["disk_only"] and not d["mismatched"],
           r.stderr + r.stdout[:500])
        for rnd_no in range(4):
            with torch.no_grad():
                for n, t in live.items():
                    flat = t.view(-1)
                    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // (50 if rnd_no % 2 else 2000)),), device=dev)
                    flat[idx] += 0.01
            torch.cuda.synchronize()
            # Rounds 2 and 3 with the smallest GPU memory budget: many small staging fills.
            budget = ["--gpu-memory", "36MiB"] if rnd_no >= 2 else []
            r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", manifest, "--json"] + budget,
                               capture_output=True, text=True)
            rep = json.loads(r.stdout) if r.returncode == 0 else {}
            ok(f"round {rnd_no}: sync --handles {' '.join(budget)}", r.returncode == 0 and rep.get("changed"), r.stderr)
            on_disk = read_safetensors(os.path.join(model, "model.safetensors"))
            want = {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in hf_view().items()}
            same = on_disk.keys() == want.keys() and all(on_disk[k] == want[k] for k in want)
            ok(f"round {rnd_no}: files equal the HF view of the live weights", same,
               ", ".join(k for k in want if on_disk.get(k) != want[k])[:300])
        r = subprocess.run([binary, "verify", "--model-dir", model], capture_output=True, text=True)
        ok("verify clean", r.returncode == 0, r.stderr)
        r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", manifest, "--json"], capture_output=True, text=True)
        ok("a second sync changes nothing", r.returncode == 0 and not json.loads(r.stdout)["changed"], r.stderr)

        # A producer that has exited: its handles cannot be used.
        gone = os.path.join(tmp, "gone.json")
        code = ("import sys, torch; sys.path.insert(0, %r); import vllm_export_hook as h; "
                "t = torch.ones(4096, 8, device='cuda', dtype=torch.bfloat16); "
                "h.write_manifest(%r, [('language_model.lm_head.weight', t)])") % (HERE, gone)
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        before = open(os.path.join(model, "model.safetensors"), "rb").read()
        r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", gone], capture_output=True, text=True)
        ok("a producer that exited gives a clear error", r.returncode != 0 and "is gone" in r.stderr, r.stderr)
        ok("and nothing is written", open(os.path.join(model, "model.safetensors"), "rb").read() == before)

        # The live producer's manifest, altered: a GPU this machine does not have, and handles
        # that are not CUDA's (stale, or from another machine).
        doc = json.load(open(manifest))
        for what, field, value, expect in [
            ("a GPU this machine does not see", "device_uuid", "GPU-00000000-0000-0000-0000-000000000000", "does not see"),
            ("a stale or foreign IPC handle", "ipc_handle", os.urandom(64).hex(), "cannot be opened"),
        ]:
            bad = os.path.join(tmp, "altered.json")
            with open(bad, "w") as f:
                json.dump({**doc, "tensors": [{**t, field: value} for t in doc["tensors"]]}, f)
            r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", bad], capture_output=True, text=True)
            ok(f"{what} gives a clear error", r.returncode != 0 and expect in r.stderr, r.stderr)
            ok(f"{what}: nothing is written", open(os.path.join(model, "model.safetensors"), "rb").read() == before)

        # The prototype's torch.save handles file, converted without unpickling arbitrary code.
        legacy_model = os.path.join(tmp, "legacy-model")
        os.makedirs(legacy_model)
        plain = {"model.norm.weight": rnd(h), "lm_head.weight": rnd(512, h), "model.embed_tokens.weight": rnd(512, h)}
        write_safetensors(os.path.join(legacy_model, "model.safetensors"), {k: v.cpu() for k, v in plain.items()})
        from torch.multiprocessing.reductions import reduce_tensor
        old = os.path.join(tmp, "vllm_weight_handles.pt")
        torch.save({**{k: {"handle": reduce_tensor(v)} for k, v in plain.items()}, "__metadata__": {"n": 3}}, old)
        converted = os.path.join(tmp, "converted.json")
        conv = os.path.join(HERE, "convert_legacy_handles.py")
        r = subprocess.run([sys.executable, conv, old, converted], capture_output=True, text=True)
        ok("legacy handles file converted", r.returncode == 0, r.stderr)
        subprocess.run([binary, "init", "--model-dir", legacy_model], capture_output=True, check=True)
        with torch.no_grad():
            for v in plain.values():
                v.view(-1)[::97] += 0.5
        torch.cuda.synchronize()
        r = subprocess.run([binary, "sync", "--model-dir", legacy_model, "--handles", converted, "--json"], capture_output=True, text=True)
        got = read_safetensors(os.path.join(legacy_model, "model.safetensors"))
        want = {k: v.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() for k, v in plain.items()}
        ok("sync from converted legacy handles", r.returncode == 0 and got == want, r.stderr)
        # A pickle that would run code is refused, and the code does not run.
        evil = os.path.join(tmp, "evil.pt")
        marker = os.path.join(tmp, "pwned")

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + marker,))

        torch.save({"x": {"handle": Evil()}}, evil)
        r = subprocess.run([sys.executable, conv, evil, os.path.join(tmp, "evil.json")], capture_output=True, text=True)
        ok("a malicious handles file is refused without running it", r.returncode != 0 and "refusing" in r.stderr and not os.path.exists(marker), r.stderr)

    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
