#!/usr/bin/env python3
"""Tensor- and pipeline-parallel GPU test of `sync --handles` (needs PyTorch and a CUDA GPU).

One producer process per rank holds that rank's shards of a small Qwen3.5-shaped model the way
vLLM shards it, and writes its manifest with the layout facts the hook writes:
- full attention: `qkv_proj` column-parallel with the KV heads replicated when tp exceeds their
  count (2 KV heads: each is held by tp/2 ranks at TP=4 and TP=8), `o_proj` row-parallel;
- MLP: `gate_up_proj` merged column-parallel, `down_proj` row-parallel;
- Gated DeltaNet: `in_proj_qkvz` (four pieces for two HF tensors) and `in_proj_ba`, `conv1d`
  (one HF tensor whose q, k, v row blocks are sharded separately), `A_log` and `dt_bias` split
  along dim 0, `out_proj` row-parallel, the norm replicated;
- vocabulary-parallel embeddings and `lm_head`, padded to a multiple of 64 rows;
- with pipeline parallelism, stage 0 holds the embeddings and layer 0, stage 1 layer 1, the final
  norm and `lm_head`.

Sets: TP=1, 2, 4, 8 and PP=2 x TP=2. Each runs three rounds (a dense change, a sparse one, a
dense one), and after each the files must equal the HF tensors byte for byte; a set with a
rank's manifest missing is refused and nothing is written. Ranks go round-robin over the GPUs
there are: with one GPU every producer shares it (that checks the reassembly across processes
and IPC handles, not multi-GPU speed, which needs as many GPUs as ranks; the per-set sync times
are printed for comparison with TP=1 all the same). Prints a pass/fail summary.

Usage: scripts/gpu_tp_test.py PATH/TO/apollo-checkpoint [--sets 1,2,4,8,pp2tp2] [--scale N]
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

# Full-model dimensions (times --scale for the hidden and intermediate sizes).
HEADS, KV_HEADS, HEAD = 16, 2, 32            # full attention: q rows 512, k and v rows 64 each
K_HEADS, V_HEADS, K_DIM, V_DIM, KERNEL = 8, 16, 32, 32, 4   # Gated DeltaNet
VOCAB, VOCAB_PAD = 1000, 64
A, G = "model.language_model.layers.0.self_attn", "model.language_model.layers.1.linear_attn"
EA, EG = "language_model.model.layers.0.self_attn", "language_model.model.layers.1.linear_attn"


def dims(scale):
    return 256 * scale, 512 * scale   # hidden, intermediate


def full_model(seed, scale):
    """The HF tensors (CPU, bf16) of the model, random by `seed`."""
    import torch
    hidden, inter = dims(scale)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    L0, L1 = "model.language_model.layers.0", "model.language_model.layers.1"
    key, value = K_HEADS * K_DIM, V_HEADS * V_DIM
    return {
        f"{A}.q_proj.weight": r(HEADS * HEAD, hidden), f"{A}.k_proj.weight": r(KV_HEADS * HEAD, hidden),
        f"{A}.v_proj.weight": r(KV_HEADS * HEAD, hidden), f"{A}.o_proj.weight": r(hidden, HEADS * HEAD),
        f"{L0}.mlp.gate_proj.weight": r(inter, hidden), f"{L0}.mlp.up_proj.weight": r(inter, hidden),
        f"{L0}.mlp.down_proj.weight": r(hidden, inter), f"{L0}.input_layernorm.weight": r(hidden),
        f"{G}.in_proj_qkv.weight": r(2 * key + value, hidden), f"{G}.in_proj_z.weight": r(value, hidden),
        f"{G}.in_proj_b.weight": r(V_HEADS, hidden), f"{G}.in_proj_a.weight": r(V_HEADS, hidden),
        f"{G}.conv1d.weight": r(2 * key + value, 1, KERNEL), f"{G}.A_log": r(V_HEADS), f"{G}.dt_bias": r(V_HEADS),
        f"{G}.norm.weight": r(V_DIM), f"{G}.out_proj.weight": r(hidden, value),
        f"{L1}.input_layernorm.weight": r(hidden),
        "model.language_model.embed_tokens.weight": r(VOCAB, hidden),
        "model.language_model.norm.weight": r(hidden), "lm_head.weight": r(VOCAB, hidden),
    }


def version(n, scale):
    """Round n's weights: odd rounds all new (dense), even ones the previous with one element
    changed in three tensors (sparse)."""
    if n % 2:
        return full_model(1000 + n, scale)
    hf = version(n - 1, scale)
    for i, name in enumerate(sorted(hf)[::7]):
        t = hf[name].view(-1)
        t[(n * 7919 + i * 104729) % t.numel()] += 1.0
    return hf


def rank_params(hf, tp, rank, stage, pp):
    """{engine name: (CPU tensor, layout facts)} of one rank, as vLLM shards and the hook describes."""
    import torch
    out = {}

    def rows(t, n, r=rank, size=tp):
        return t[r * n // size:(r + 1) * n // size]

    def piece(total):
        return {"rows": total, "local_rows": total // tp, "first_row": rank * (total // tp)}

    def facts(**kw):
        return dict({"tp_rank": rank, "tp_size": tp, "shard_dim": 0 if tp > 1 else None}, **kw)

    if stage == 0:
        # qkv_proj: this rank's q heads, and the one KV head group it holds (replicated when tp > KV heads).
        q, k, v = hf[f"{A}.q_proj.weight"], hf[f"{A}.k_proj.weight"], hf[f"{A}.v_proj.weight"]
        kv_heads = max(1, KV_HEADS // tp)
        replicas = max(1, tp // KV_HEADS)
        kv_rank = rank // replicas
        kv = kv_heads * HEAD
        parts = [{"name": "q_proj", **piece(HEADS * HEAD)},
                 {"name": "k_proj", "rows": KV_HEADS * HEAD, "local_rows": kv, "first_row": kv_rank * kv},
                 {"name": "v_proj", "rows": KV_HEADS * HEAD, "local_rows": kv, "first_row": kv_rank * kv}]
        out[f"{EA}.qkv_proj.weight"] = (
            torch.cat([rows(q, HEADS * HEAD), k[kv_rank * kv:(kv_rank + 1) * kv], v[kv_rank * kv:(kv_rank + 1) * kv]]),
            facts(packed="qkv_proj", parts=parts))
        o = hf[f"{A}.o_proj.weight"]
        out[f"{EA}.o_proj.weight"] = (rows(o.t(), o.shape[1]).t().contiguous(), facts(shard_dim=1 if tp > 1 else None))
        m, em = "model.language_model.layers.0.mlp", "language_model.model.layers.0.mlp"
        gate, up = hf[f"{m}.gate_proj.weight"], hf[f"{m}.up_proj.weight"]
        out[f"{em}.gate_up_proj.weight"] = (
            torch.cat([rows(gate, gate.shape[0]), rows(up, up.shape[0])]),
            facts(packed="gate_up_proj", parts=[{"name": "gate_proj", **piece(gate.shape[0])},
                                                {"name": "up_proj", **piece(up.shape[0])}]))
        d = hf[f"{m}.down_proj.weight"]
        out[f"{em}.down_proj.weight"] = (rows(d.t(), d.shape[1]).t().contiguous(), facts(shard_dim=1 if tp > 1 else None))
        out["language_model.model.layers.0.input_layernorm.weight"] = (
            hf["model.language_model.layers.0.input_layernorm.weight"], facts(shard_dim=None))
        out["language_model.model.embed_tokens.weight"] = vocab_shard(hf["model.language_model.embed_tokens.weight"],
                                                                     "embed_tokens", tp, rank)
    if stage == pp - 1:
        key, value = K_HEADS * K_DIM, V_HEADS * V_DIM
        qkv, z = hf[f"{G}.in_proj_qkv.weight"], hf[f"{G}.in_proj_z.weight"]
        qs, ks, vs = qkv[:key], qkv[key:2 * key], qkv[2 * key:]
        out[f"{EG}.in_proj_qkvz.weight"] = (
            torch.cat([rows(qs, key), rows(ks, key), rows(vs, value), rows(z, value)]),
            facts(packed="in_proj_qkvz", names=["in_proj_qkv", "in_proj_z"],
                  pieces=[piece(key), piece(key), piece(value), piece(value)]))
        b, a = hf[f"{G}.in_proj_b.weight"], hf[f"{G}.in_proj_a.weight"]
        out[f"{EG}.in_proj_ba.weight"] = (
            torch.cat([rows(b, V_HEADS), rows(a, V_HEADS)]),
            facts(packed="in_proj_ba", names=["in_proj_b", "in_proj_a"], pieces=[piece(V_HEADS), piece(V_HEADS)]))
        c = hf[f"{G}.conv1d.weight"]
        out[f"{EG}.conv1d.weight"] = (
            torch.cat([rows(c[:key], key), rows(c[key:2 * key], key), rows(c[2 * key:], value)]),
            facts(packed="conv1d", names=["conv1d"], pieces=[piece(key), piece(key), piece(value)]))
        for name in ("A_log", "dt_bias"):
            out[f"{EG}.{name}"] = (rows(hf[f"{G}.{name}"], V_HEADS), facts())
        out[f"{EG}.norm.weight"] = (hf[f"{G}.norm.weight"], facts(shard_dim=None))
        o = hf[f"{G}.out_proj.weight"]
        out[f"{EG}.out_proj.weight"] = (rows(o.t(), o.shape[1]).t().contiguous(), facts(shard_dim=1 if tp > 1 else None))
        out["language_model.model.layers.1.input_layernorm.weight"] = (
            hf["model.language_model.layers.1.input_layernorm.weight"], facts(shard_dim=None))
        out["language_model.model.norm.weight"] = (hf["model.language_model.norm.weight"], facts(shard_dim=None))
        out["language_model.lm_head.weight"] = vocab_shard(hf["lm_head.weight"], "lm_head", tp, rank)
    return out


def vocab_shard(t, short, tp, rank):
    """vLLM's VocabParallelEmbedding: the vocabulary padded to a multiple of 64, split evenly;
    the last rank's padding rows follow its real ones."""
    import torch
    padded = -(-VOCAB // VOCAB_PAD) * VOCAB_PAD
    per = padded // tp
    start, end = min(rank * per, VOCAB), min((rank + 1) * per, VOCAB)
    local = torch.zeros(per, t.shape[1], dtype=t.dtype)
    local[:end - start] = t[start:end]
    parts = [{"name": short, "rows": VOCAB, "local_rows": end - start, "first_row": start}]
    if per > end - start:
        parts.append({"name": "", "rows": per - (end - start), "local_rows": per - (end - start), "first_row": 0})
    return local, {"tp_rank": rank, "tp_size": tp, "shard_dim": 0 if tp > 1 else None, "packed": short, "parts": parts}


def producer(tp, rank, pp, stage, round_, scale, manifest, ready):
    """One rank: its shards on its GPU, a manifest, then wait to be killed."""
    import torch
    import vllm_export_hook as hook
    params = rank_params(version(round_, scale), tp, rank, stage, pp)
    live = {n: t.contiguous().cuda() for n, (t, _) in params.items()}
    torch.cuda.synchronize()
    meta = {"tp_rank": rank, "tp_size": tp, "pp_rank": stage, "pp_size": pp, "export_id": f"r{round_}"}
    hook.write_manifest(manifest, list(live.items()), meta=meta, layouts={n: f for n, (_, f) in params.items()})
    open(ready, "w").close()
    while True:
        time.sleep(1)


def parse_set(s):
    """'4' -> (tp 4, pp 1); 'pp2tp2' -> (2, 2)."""
    if s.startswith("pp"):
        pp, tp = s[2:].split("tp")
        return int(tp), int(pp)
    return int(s), 1


def main():
    if len(sys.argv) == 10 and sys.argv[1] == "--producer":
        a = sys.argv[2:]
        producer(int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6], a[7])
        return 0
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__)
        return 2
    binary, sets, scale = args[0], "1,2,4,8,pp2tp2", 1
    for flag, value in zip(args[1::2], args[2::2]):
        if flag == "--sets":
            sets = value
        elif flag == "--scale":
            scale = int(value)
    torch = gpu_checks.cuda_torch(1)
    if torch is None:
        return gpu_checks.SKIP
    gpus = torch.cuda.device_count()
    from gpu_sync_test import read_safetensors, write_safetensors
    checks = gpu_checks.Checks()
    ok = checks.ok
    times = {}
    print(f"{gpus} GPU(s): ranks go round-robin over them")

    for spec in sets.split(","):
        tp, pp = parse_set(spec)
        label = f"TP={tp}" + (f" x PP={pp}" if pp > 1 else "")
        with tempfile.TemporaryDirectory() as tmp:
            model = os.path.join(tmp, "model")
            os.makedirs(model)
            write_safetensors(os.path.join(model, "model.safetensors"), full_model(7, scale))
            subprocess.run([binary, "init", "--model-dir", model], check=True, capture_output=True)
            for round_ in (1, 2, 3):
                kind = "dense" if round_ % 2 else "sparse"
                handles = os.path.join(tmp, f"handles-{round_}")
                os.makedirs(handles)
                procs = []
                for stage in range(pp):
                    for rank in range(tp):
                        i = stage * tp + rank
                        ready = os.path.join(tmp, f"ready-{round_}-{i}")
                        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % gpus))
                        manifest = os.path.join(handles, f"handles-pp{stage}-tp{rank}.json")
                        cmd = [sys.executable, __file__, "--producer", str(tp), str(rank), str(pp), str(stage),
                               str(round_), str(scale), manifest, ready]
                        procs.append((subprocess.Popen(cmd, env=env), ready))
                for p, ready in procs:
                    for _ in range(1200):
                        if os.path.exists(ready) or p.poll() is not None:
                            break
                        time.sleep(0.1)
                try:
                    if round_ == 3:
                        # A set with one rank missing: refused, nothing written.
                        missing = os.path.join(handles, f"handles-pp{pp - 1}-tp{tp - 1}.json")
                        aside = missing + ".aside"
                        os.rename(missing, aside)
                        before = read_safetensors(os.path.join(model, "model.safetensors"))
                        r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", handles],
                                           capture_output=True, text=True)
                        if tp * pp > 1:
                            ok(f"{label}: a missing rank is refused", r.returncode == 65 and "missing" in r.stderr,
                               f"exit {r.returncode}: {r.stderr[-300:]}")
                            ok(f"{label}: and nothing is written",
                               read_safetensors(os.path.join(model, "model.safetensors")) == before)
                        os.rename(aside, missing)
                    r = subprocess.run([binary, "diagnose", "--model-dir", model, "--handles", handles, "--json"],
                                       capture_output=True, text=True)
                    d = json.loads(r.stdout) if r.returncode == 0 else {}
                    ok(f"{label}: round {round_} ({kind}): diagnose matches every tensor",
                       r.returncode == 0 and not d["live_only"] and not d["disk_only"] and not d["mismatched"],
                       r.stderr + r.stdout[:400])
                    r = subprocess.run([binary, "sync", "--model-dir", model, "--handles", handles, "--json"],
                                       capture_output=True, text=True)
                    j = json.loads(r.stdout) if r.returncode == 0 else {}
                    ok(f"{label}: round {round_} ({kind}): sync", r.returncode == 0 and j.get("changed"), r.stderr[-500:])
                    times[(label, kind, round_)] = j.get("seconds")
                    got = read_safetensors(os.path.join(model, "model.safetensors"))
                    want = {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                            for k, v in version(round_, scale).items()}
                    ok(f"{label}: round {round_} ({kind}): files equal the HF tensors byte for byte", got == want,
                       ", ".join(k for k in want if got.get(k) != want[k])[:300])
                finally:
                    for p, _ in procs:
                        p.kill()
                        p.wait()
            r = subprocess.run([binary, "verify", "--model-dir", model], capture_output=True, text=True)
            ok(f"{label}: verify clean", r.returncode == 0, r.stderr)

    print("sync seconds per set and round, and against TP=1 in the same round "
          "(one GPU shared by every rank unless there are as many GPUs as ranks):")
    for (label, kind, round_), s in sorted(times.items(), key=lambda kv: kv[0][2]):
        base = times.get(("TP=1", kind, round_))
        ratio = f"{s / base:.2f}x TP=1" if s and base else ""
        print(f"  {label:<12} round {round_} {kind:<6} {s:.3f} s  {ratio}" if s else f"  {label:<12} round {round_} failed")
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
