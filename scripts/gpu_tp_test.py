#!/usr/bin/env python3
"""Tensor-parallel GPU test of `sync --handles` (needs at least 2 CUDA GPUs and PyTorch).

One producer process per rank, each seeing only its own GPU (CUDA_VISIBLE_DEVICES), holds that
rank's shards of a small model the way vLLM shards it at tp=2 — packed qkv_proj and gate_up_proj
column-parallel ([q_r; k_r; v_r], [gate_r; up_r]), o_proj and down_proj row-parallel, embeddings
column-parallel, norms replicated — and writes its manifest with the layout facts. The binary
syncs from the folder of manifests (mapping each rank to its GPU by UUID) and the files must equal
the HF tensors. Two versions of the weights are synced in turn. Prints a pass/fail summary; skips
(exit 77) with fewer than 2 GPUs.

Usage: scripts/gpu_tp_test.py PATH/TO/apollo-checkpoint
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402
TP, H, INTER, Q, KV, VOCAB = 2, 128, 256, 128, 32, 512


def full_model(version):
    """The HF tensors (CPU, bf16) of `version`."""
    import torch
    g = torch.Generator().manual_seed(1000 + version)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    p = "model.language_model.layers.0"
    return {
        f"{p}.self_attn.q_proj.weight": r(Q, H), f"{p}.self_attn.k_proj.weight": r(KV, H),
        f"{p}.self_attn.v_proj.weight": r(KV, H), f"{p}.self_attn.o_proj.weight": r(H, Q // 2),
        f"{p}.mlp.gate_proj.weight": r(INTER, H), f"{p}.mlp.up_proj.weight": r(INTER, H),
        f"{p}.mlp.down_proj.weight": r(H, INTER), f"{p}.input_layernorm.weight": r(H),
        "model.language_model.embed_tokens.weight": r(VOCAB, H),
    }


def producer(rank, version, manifest, ready):
    """One rank: its shards on its GPU, a manifest, then wait to be killed."""
    import torch
    import vllm_export_hook as hook
    hf = full_model(version)
    p = "language_model.model.layers.0"
    hp = "model.language_model.layers.0"
    rows = lambda t, n: t[rank * n // TP:(rank + 1) * n // TP]  # noqa: E731
    live, layouts = {}, {}

    def packed(mod, token, parts):
        name = f"{p}.{mod}.{token}.weight"
        live[name] = torch.cat([rows(hf[f"{hp}.{mod}.{part}.weight"], n) for part, n in parts]).cuda()
        layouts[name] = {"tp_rank": rank, "tp_size": TP, "shard_dim": 0, "packed": token,
                         "parts": [{"name": part, "rows": n, "local_rows": n // TP, "first_row": rank * n // TP} for part, n in parts]}

    packed("self_attn", "qkv_proj", [("q_proj", Q), ("k_proj", KV), ("v_proj", KV)])
    packed("mlp", "gate_up_proj", [("gate_proj", INTER), ("up_proj", INTER)])
    for name, mod, cols in [("self_attn.o_proj", "self_attn.o_proj", Q // 2), ("mlp.down_proj", "mlp.down_proj", INTER)]:
        t = hf[f"{hp}.{mod}.weight"]
        live[f"{p}.{name}.weight"] = t[:, rank * cols // TP:(rank + 1) * cols // TP].contiguous().cuda()
        layouts[f"{p}.{name}.weight"] = {"tp_rank": rank, "tp_size": TP, "shard_dim": 1}
    live["language_model.model.embed_tokens.weight"] = rows(hf["model.language_model.embed_tokens.weight"], VOCAB).contiguous().cuda()
    layouts["language_model.model.embed_tokens.weight"] = {"tp_rank": rank, "tp_size": TP, "shard_dim": 0}
    live[f"{p}.input_layernorm.weight"] = hf[f"{hp}.input_layernorm.weight"].cuda()
    layouts[f"{p}.input_layernorm.weight"] = {"tp_rank": rank, "tp_size": TP, "shard_dim": None}
    torch.cuda.synchronize()
    meta = {"tp_rank": rank, "tp_size": TP, "pp_rank": 0, "pp_size": 1, "export_id": f"v{version}"}
    hook.write_manifest(manifest, list(live.items()), meta=meta, layouts=layouts)
    open(ready, "w").close()
    while True:
        time.sleep(1)


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--producer":
        producer(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    torch = gpu_checks.cuda_torch(TP)
    if torch is None:
        return gpu_checks.SKIP
    from gpu_sync_test import read_safetensors, write_safetensors
    binary = sys.argv[1]
    checks = gpu_checks.Checks()
    ok = checks.ok

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_safetensors(os.path.join(model, "model.safetensors"), full_model(0))
        subprocess.run([binary, "init", "--model-dir", model], check=True, capture_output=True)
        for version in (1, 2):
            handles = os.path.join(tmp, f"handles-v{version}")
            os.makedirs(handles)
            procs = []
            for rank in range(TP):
                ready = os.path.join(tmp, f"ready-{version}-{rank}")
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(rank))
                procs.append((subprocess.Popen([sys.executable, __file__, "--producer", str(rank), str(version),
                                                os.path.join(handles, f"handles-pp0-tp{rank}.json"), ready], env=env), ready))
            for _, ready in procs:
                for _ in range(600):
                    if os.path.exists(ready):
                        break
                    time.sleep(0.1)
            r = subprocess.run([binary, "diagnose", "--model-dir", model, "--handles", handles, "--json"], capture_output=True, text=True)
            d = json.loads(r.stdout) if r.returncode == 0 else {}
            ok(f"v{version}: diagnose matches every tensor across 2 ranks",
               r.returncode == 0 and not d["live_only"] and not d["disk_only"] and not d["mismatched"], r.stderr + r.stdout[:400])
            r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", handles, "--json"], capture_output=True, text=True)
            ok(f"v{version}: sync --handles from 2 GPUs", r.returncode == 0 and json.loads(r.stdout)["changed"], r.stderr)
            got = read_safetensors(os.path.join(model, "model.safetensors"))
            want = {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in full_model(version).items()}
            ok(f"v{version}: files equal the HF tensors", got == want, ", ".join(k for k in want if got.get(k) != want[k])[:300])
            for p, _ in procs:
                p.kill()
                p.wait()
        r = subprocess.run([binary, "verify", "--model-dir", model], capture_output=True, text=True)
        ok("verify clean", r.returncode == 0, r.stderr)

    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
