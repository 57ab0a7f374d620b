#!/usr/bin/env python3
"""GPU end-to-end test of naming schemes, pipeline stages and experts (run on a CUDA GPU with PyTorch).

Each scenario is one producer (this process) holding live weights on the GPU in the layout and
with the names vLLM uses, model files named as the checkpoint names them, and the manifests the
export hook writes; `init`, `diagnose`, then rounds of in-place changes (sparse, then every block)
each followed by `sync --handles` and a byte-for-byte comparison of the files with the HF view of
the live weights:

1. text-only files (`model.layers.N.…`, `lm_head.weight`) served by vLLM's vision-language class
   (`language_model.model.layers.N.…`, `language_model.lm_head.weight`): the original
   prototype's deployment;
2. vision-language files (`model.language_model.…`, `model.visual.…`) with vLLM's VL names and a
   vision tower whose attention is fused in both (`attn.qkv`);
3. a MoE layer in FusedMoE's stacked layout (`experts.w13_weight` [E, 2I, H], `w2_weight`
   [E, H, I]) against per-expert checkpoint tensors;
4. two pipeline stages (two manifests of one export); with one stage's manifest missing the sync
   is refused and writes nothing.

Finally memory from PyTorch's expandable segments (cuMemCreate, like vLLM's sleep mode) is
refused by the hook, by the driver's own answer. Prints a pass/fail summary; exits non-zero on
failure; skips (exit 77, saying so) without PyTorch or a GPU.

Usage: scripts/gpu_names_test.py PATH/TO/apollo-checkpoint
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402
from gpu_sync_test import read_safetensors, write_safetensors  # noqa: E402


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
    torch.manual_seed(2)
    h, inter = 256, 512

    def rnd(*shape):
        return (torch.randn(*shape, device="cuda") * 0.02).to(torch.bfloat16)

    def run(*args):
        r = subprocess.run([binary, *args], capture_output=True, text=True)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}), r.stderr

    def packed(live, facts, view, name, parts, engine_prefix, hf_prefix):
        """A packed [part; part; ...] parameter: live tensor, its facts, its HF view."""
        t = rnd(sum(rows for _, rows in parts), h)
        live[engine_prefix + name] = t
        facts[engine_prefix + name] = {"tp_rank": 0, "tp_size": 1, "shard_dim": None, "packed": name.split(".")[-2],
                                       "parts": [{"name": p, "rows": r, "local_rows": r, "first_row": 0} for p, r in parts]}
        row = 0
        for p, rows in parts:
            view[hf_prefix + name.replace(name.split(".")[-2], p)] = lambda t=t, a=row, b=row + rows: t[a:b]
            row += rows

    def plain(live, view, engine, hf, t):
        live[engine] = t
        view[hf] = lambda t=t: t

    def scenario(title, stages, hf_files):
        """stages: [(live, facts, meta)] (one manifest each); view: {HF name: live slice}."""
        with tempfile.TemporaryDirectory() as tmp:
            model, handles = os.path.join(tmp, "model"), os.path.join(tmp, "handles")
            os.makedirs(model)
            os.makedirs(handles)

            def hf_bytes():
                return {k: f().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() for k, f in hf_files.items()}

            write_safetensors(os.path.join(model, "model.safetensors"), {k: f().cpu() for k, f in hf_files.items()})
            paths = []
            for i, (live, facts, meta) in enumerate(stages):
                path = os.path.join(handles, hook.manifest_name(meta.get("pp_rank", 0), 0))
                hook.write_manifest(path, list(live.items()), meta={"export_id": "x", **meta}, layouts=facts)
                paths.append(path)
            code, _, err = run("init", "--model-dir", model)
            ok(f"{title}: init", code == 0, err)
            code, d, err = run("diagnose", "--model-dir", model, "--handles", handles, "--json")
            ok(f"{title}: diagnose matches every tensor", code == 0 and d.get("ok") and not d["disk_only"], err + json.dumps(d)[:400])
            # One bf16 element in every 2000th 4 KiB block, then in every block (a training step).
            for round_no, blocks in enumerate([2000, 1]):
                with torch.no_grad():
                    for live, _, _ in stages:
                        for t in live.values():
                            t.view(-1)[:: 2048 * blocks] += 0.01
                torch.cuda.synchronize()
                code, rep, err = run("sync", "--model-dir", model, "--handles", handles, "--json")
                ok(f"{title}: round {round_no} sync", code == 0 and rep.get("changed") and not rep.get("untouched"), err)
                got = read_safetensors(os.path.join(model, "model.safetensors"))
                want = hf_bytes()
                ok(f"{title}: round {round_no} files equal the HF view byte for byte", got == want,
                   ", ".join(k for k in want if got.get(k) != want[k])[:300])
            if len(paths) > 1:
                os.rename(paths[-1], paths[-1] + ".away")
                before = open(os.path.join(model, "model.safetensors"), "rb").read()
                code, _, err = run("sync", "--model-dir", model, "--handles", handles)
                ok(f"{title}: a missing stage is refused", code == 65 and "missing pp1-tp0" in err, err)
                ok(f"{title}: and nothing is written", open(os.path.join(model, "model.safetensors"), "rb").read() == before)

    def dense_model(engine_prefix, hf_prefix, lm_head_engine):
        live, facts, view = {}, {}, {}
        layer = "layers.0."
        packed(live, facts, view, f"{layer}self_attn.qkv_proj.weight", [("q_proj", 512), ("k_proj", 128), ("v_proj", 128)],
               engine_prefix, hf_prefix)
        packed(live, facts, view, f"{layer}mlp.gate_up_proj.weight", [("gate_proj", inter), ("up_proj", inter)],
               engine_prefix, hf_prefix)
        plain(live, view, f"{engine_prefix}{layer}mlp.down_proj.weight", f"{hf_prefix}{layer}mlp.down_proj.weight", rnd(h, inter))
        plain(live, view, f"{engine_prefix}embed_tokens.weight", f"{hf_prefix}embed_tokens.weight", rnd(1024, h))
        plain(live, view, lm_head_engine, "lm_head.weight", rnd(1024, h))
        return live, facts, view

    # 1. The prototype's deployment: VL wrapper names, text-only files.
    live, facts, view = dense_model("language_model.model.", "model.", "language_model.lm_head.weight")
    scenario("text-only files, vLLM VL names", [(live, facts, {})], view)

    # 2. VL files with VL names and a fused vision attention.
    live, facts, view = dense_model("language_model.model.", "model.language_model.", "language_model.lm_head.weight")
    qkv = rnd(3 * 128, 128)
    live["visual.blocks.0.attn.qkv.weight"] = qkv
    facts["visual.blocks.0.attn.qkv.weight"] = {"tp_rank": 0, "tp_size": 1, "shard_dim": None, "packed": "qkv", "names": ["qkv"],
                                                "pieces": [{"rows": 128, "local_rows": 128, "first_row": 0}] * 3}
    view["model.visual.blocks.0.attn.qkv.weight"] = lambda: qkv
    scenario("VL files, vLLM VL names, fused vision qkv", [(live, facts, {})], view)

    # 3. FusedMoE experts.
    experts, i_moe = 8, 128
    live, facts, view = dense_model("model.", "model.", "lm_head.weight")
    w13, w2 = rnd(experts, 2 * i_moe, h), rnd(experts, h, i_moe)
    m = "model.layers.1.mlp.experts"
    live[f"{m}.w13_weight"], live[f"{m}.w2_weight"] = w13, w2
    for name, kind in [("w13_weight", "w13"), ("w2_weight", "w2")]:
        facts[f"{m}.{name}"] = {"tp_rank": 0, "tp_size": 1, "shard_dim": None,
                                "experts": {"kind": kind, "experts": list(range(experts)), "num_experts": experts}}
    for e in range(experts):
        view[f"{m}.{e}.gate_proj.weight"] = lambda e=e: w13[e, :i_moe]
        view[f"{m}.{e}.up_proj.weight"] = lambda e=e: w13[e, i_moe:]
        view[f"{m}.{e}.down_proj.weight"] = lambda e=e: w2[e]
    scenario("FusedMoE experts", [(live, facts, {})], view)

    # 4. Two pipeline stages.
    s0, f0, v0 = dense_model("model.", "model.", "lm_head.weight")
    s1 = {"model.layers.1.mlp.down_proj.weight": rnd(h, inter), "model.norm.weight": rnd(h)}
    lm = s0.pop("lm_head.weight")
    s1["lm_head.weight"] = lm
    view = dict(v0)
    for k, t in s1.items():
        view[k] = lambda t=t: t
    scenario("two pipeline stages", [(s0, f0, {"pp_rank": 0, "pp_size": 2}), (s1, {}, {"pp_rank": 1, "pp_size": 2})], view)

    # 5. Memory CUDA IPC cannot share: PyTorch's expandable segments (cuMemCreate, as vLLM's
    # sleep mode). The driver says so, and the hook refuses the tensor.
    code = ("import sys, torch; sys.path.insert(0, %r); import vllm_export_hook as h\n"
            "t = torch.ones(1 << 20, device='cuda')\n"
            "print(h.legacy_ipc_capable(t.data_ptr()))\n"
            "try:\n    h.manifest_entry('w', t)\n    print('exported')\n"
            "except h.ExportError as e:\n    print('refused:', e)\n") % HERE
    plain_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    ok("plain caching allocator: the driver says shareable, the hook exports",
       plain_run.stdout.split()[:2] == ["True", "exported"], plain_run.stdout + plain_run.stderr)
    exp_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    ok("expandable segments: the driver says not shareable, the hook refuses",
       exp_run.stdout.startswith("False") and "refused" in exp_run.stdout and "sleep-mode" in exp_run.stdout,
       exp_run.stdout + exp_run.stderr)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
