#!/usr/bin/env python3
"""Benchmark `sync --handles` against the original prototype on one GPU (run on a GPU host).

This process plays the serving engine: it holds a Qwen3.5-27B-shaped model (real dimensions,
--layers of its 64 layers; 16 layers is about 17 GB) on the GPU in vLLM's packed layout with
vLLM's vision-language wrapper names, and exports it twice: manifests for apollo-checkpoint
(scripts/vllm_export_hook.py) and the prototype's torch.save handles file. Two copies of the
text-only HF files are written (sharded, with an index), one per tool; apollo-checkpoint indexes
its copy. Then for each change, made in place on the GPU:

  nothing    no change
  sparse     one bf16 element in 0.5% of the 4 KiB blocks
  dense      one bf16 element in every 4 KiB block (what a training step does)
  elements   1% of the elements, at random
  tensors    three large tensors replaced

it times `apollo-checkpoint sync --handles` --repeat times (each after a fresh change of that
kind; the median is reported, with every run) and then the prototype once
(`checkpoint_sync.py sync`, given with --prototype) on the same live weights, and checks that
the two copies are identical byte for byte afterwards (each tool writes the live weights; the
prototype reads every byte, so it is the reference). Dirty pages are written back (`sync`)
before each timed run, for both tools. Reported per change: wall seconds of both, ours per
phase, bytes copied from the GPU and copies made, model bytes read and written, our peak
anonymous RSS, the GPU memory our tool allocates, and the figures scaled per 54 GB.
Prints one JSON object on stdout (progress on stderr); exits 77 without PyTorch or a GPU.

With --resident, ours is one `sync --every 24h` process for the whole run (started after init,
its first sync awaited) and each timed sync is SIGUSR1 to its JSON line: the time a resident
process (scripts/systemd/apollo-checkpoint-resident.service) takes per sync, without a fresh
process's GPU context. Its RSS is sampled while each sync runs.

With --baseline (another build of apollo-checkpoint with the same index schema), each of our
runs is followed by one of the baseline's, after its own fresh change, on the same model copy
(one resident process each with --resident): an A/B in one run, reported beside ours per change
(`baseline_s`, `baseline_vs_ours`).

With --page-writes (the built `examples/page_writes`), the JSON's "host" also holds what one
scattered 4 KiB write into the page cache of a file in --dir costs there, the floor of a sparse
sync's apply (see that example), with the kernel and the filesystem.

Usage: scripts/bench_gpu_sync.py --bin apollo-checkpoint --prototype checkpoint_sync.py
                                 [--layers 16] [--dir DIR] [--repeat 3] [--resident]
                                 [--baseline OTHER-BUILD] [--page-writes examples/page_writes]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402

HIDDEN, INTER, VOCAB = 5120, 17408, 248320
Q, KV = 24 * 256 * 2, 4 * 256  # gated query: 2 x 24 heads of 256; 4 KV heads of 256
KEY, VALUE, VHEADS = 16 * 128, 48 * 128, 48
MIB = 1 << 20
PER_54GB = 54e9
KINDS = ["nothing", "sparse", "dense", "elements", "tensors"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def engine_model(torch, layers):
    """{engine name: (GPU tensor, {packed module: [(HF part, rows)]} or None)}."""
    g = torch.Generator(device="cuda").manual_seed(5)

    def rnd(*shape, dtype=torch.bfloat16):
        t = torch.empty(*shape, device="cuda", dtype=torch.float32)
        t.normal_(0, 0.02, generator=g)
        return t.to(dtype)

    out = {}
    p = "language_model.model.layers"
    for i in range(layers):
        if i % 4 == 3:
            out[f"{p}.{i}.self_attn.qkv_proj.weight"] = (rnd(Q + 2 * KV, HIDDEN),
                                                          ("qkv_proj", [("q_proj", Q), ("k_proj", KV), ("v_proj", KV)]))
            out[f"{p}.{i}.self_attn.o_proj.weight"] = (rnd(HIDDEN, Q // 2), None)
            out[f"{p}.{i}.self_attn.q_norm.weight"] = (rnd(256), None)
            out[f"{p}.{i}.self_attn.k_norm.weight"] = (rnd(256), None)
        else:
            a = f"{p}.{i}.linear_attn"
            out[f"{a}.in_proj_qkvz.weight"] = (rnd(2 * KEY + 2 * VALUE, HIDDEN),
                                               ("in_proj_qkvz", [("in_proj_qkv", 2 * KEY + VALUE), ("in_proj_z", VALUE)]))
            out[f"{a}.in_proj_ba.weight"] = (rnd(2 * VHEADS, HIDDEN), ("in_proj_ba", [("in_proj_b", VHEADS), ("in_proj_a", VHEADS)]))
            out[f"{a}.conv1d.weight"] = (rnd(2 * KEY + VALUE, 1, 4), None)
            out[f"{a}.A_log"] = (rnd(VHEADS, dtype=torch.float32), None)
            out[f"{a}.dt_bias"] = (rnd(VHEADS), None)
            out[f"{a}.norm.weight"] = (rnd(128), None)
            out[f"{a}.out_proj.weight"] = (rnd(HIDDEN, VALUE), None)
        out[f"{p}.{i}.mlp.gate_up_proj.weight"] = (rnd(2 * INTER, HIDDEN), ("gate_up_proj", [("gate_proj", INTER), ("up_proj", INTER)]))
        out[f"{p}.{i}.mlp.down_proj.weight"] = (rnd(HIDDEN, INTER), None)
        out[f"{p}.{i}.input_layernorm.weight"] = (rnd(HIDDEN), None)
        out[f"{p}.{i}.post_attention_layernorm.weight"] = (rnd(HIDDEN), None)
    out["language_model.model.embed_tokens.weight"] = (rnd(VOCAB, HIDDEN), None)
    out["language_model.model.norm.weight"] = (rnd(HIDDEN), None)
    out["language_model.lm_head.weight"] = (rnd(VOCAB, HIDDEN), None)
    return out


def hf_name(engine):
    return engine.removeprefix("language_model.")


def hf_view(model):
    """[(HF name, GPU view)] of the engine's tensors, in the text-only checkpoint's naming."""
    out = []
    for name, (t, packing) in model.items():
        if packing is None:
            out.append((hf_name(name), t))
            continue
        packed, parts = packing
        row = 0
        for part, rows in parts:
            out.append((hf_name(name).replace(packed, part), t[row:row + rows]))
            row += rows
    return out


def write_shards(torch, directory, view, shard_bytes=4 << 30):
    """The HF view as sharded safetensors files with an index."""
    import struct
    os.makedirs(directory, exist_ok=True)
    st = {torch.bfloat16: "BF16", torch.float32: "F32"}
    shards, current, size = [], [], 0
    for name, t in sorted(view):
        n = t.numel() * t.element_size()
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, t in shard:
            n = t.numel() * t.element_size()
            header[name] = {"dtype": st[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for _, t in shard:
                f.write(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def rss_sampler(pid, running):
    """A started thread that samples the anonymous RSS of `pid` while `running()`; its `peak`
    list holds the largest seen, in bytes."""
    peak = [0]

    def sample():
        while running():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.peak = peak
    th.start()
    return th


def timed(cmd, env=None):
    """Runs `cmd`; returns (wall seconds, stdout, stderr, return code, peak anonymous RSS)."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    th = rss_sampler(p.pid, lambda: p.poll() is None)
    out, err = p.communicate()
    wall = time.perf_counter() - start
    th.join()
    return wall, out, err, p.returncode, th.peak[0]


class Resident:
    """Ours as one resident `sync --every` process: each sync asked for with SIGUSR1."""

    def __init__(self, cmd, log_path):
        self.err = open(log_path, "w+")
        self.p = subprocess.Popen(cmd + ["--every", "24h"], stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.first = json.loads(self.p.stdout.readline() or "{}")

    def sync(self):
        """(wall seconds, report, exit code, peak anonymous RSS while it ran, its stderr)."""
        start_err = self.err.tell()
        done = threading.Event()
        th = rss_sampler(self.p.pid, lambda: not done.is_set())
        start = time.perf_counter()
        self.p.send_signal(signal.SIGUSR1)
        line = self.p.stdout.readline()
        wall = time.perf_counter() - start
        done.set()
        th.join()
        rep = json.loads(line) if line else {"exit_code": self.p.poll()}
        self.err.flush()
        self.err.seek(start_err)
        err = self.err.read()
        return wall, rep, rep.get("exit_code", 0), th.peak[0], err

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=120)


def identical(a, b):
    """Whether two model directories hold the same files, byte for byte (cmp, in parallel)."""
    names = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    procs = [subprocess.Popen(["cmp", "-s", os.path.join(a, n), os.path.join(b, n)]) for n in names]
    return all(p.wait() == 0 for p in procs) and names == sorted(f for f in os.listdir(b) if f.endswith(".safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--prototype", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dir")
    ap.add_argument("--changes", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--repeat", type=int, default=3, help="our runs per change (median reported)")
    ap.add_argument("--verbose", action="store_true", help="run ours with -vv and log its stderr (timings of each step)")
    ap.add_argument("--resident", action="store_true",
                    help="time ours as one resident `sync --every` process, each sync asked for with SIGUSR1")
    ap.add_argument("--baseline", help="another build to run alternately with --bin on the same model copy (A/B)")
    ap.add_argument("--page-writes", help="the built examples/page_writes: measure scattered page-cache writes in --dir first")
    ap.add_argument("--gpu-memory-mib", type=int, default=144,
                    help="our --gpu-memory per GPU, in MiB (split 1:4:4 into whole MiB, as src/live/gpu.rs does)")
    args = ap.parse_args()
    torch = gpu_checks.cuda_torch()
    if torch is None:
        return gpu_checks.SKIP
    import vllm_export_hook as hook
    from torch.multiprocessing.reductions import reduce_tensor

    host = host_info(args.dir or tempfile.gettempdir(), args.page_writes)
    model = engine_model(torch, args.layers)
    total = sum(t.numel() * t.element_size() for t, _ in model.values())
    log(f"model: {total / 1e9:.2f} GB in {len(model)} engine tensors")
    work = tempfile.mkdtemp(dir=args.dir)
    ours, proto = os.path.join(work, "ours"), os.path.join(work, "proto")
    handles = os.path.join(work, "handles")
    os.makedirs(handles)
    layouts = {}
    for name, (t, packing) in model.items():
        if packing:
            packed, parts = packing
            layouts[name] = {"tp_rank": 0, "tp_size": 1, "shard_dim": None, "packed": packed,
                             "parts": [{"name": p, "rows": r, "local_rows": r, "first_row": 0} for p, r in parts]}
    hook.write_manifest(os.path.join(handles, "handles-pp0-tp0.json"), [(n, t) for n, (t, _) in model.items()],
                        meta={"export_id": "bench", "tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1},
                        layouts=layouts)
    legacy = os.path.join(work, "vllm_weight_handles.pt")
    torch.save({**{n: {"handle": reduce_tensor(t)} for n, (t, _) in model.items()}, "__metadata__": {}}, legacy)
    t0 = time.perf_counter()
    write_shards(torch, ours, hf_view(model))
    subprocess.run(["cp", "-r", ours, proto], check=True)
    log(f"files written in {time.perf_counter() - t0:.1f} s")
    r = subprocess.run([args.bin, "init", "--model-dir", ours, "--json"], capture_output=True, text=True, check=True)
    log(f"init: {json.loads(r.stdout)['seconds']:.2f} s")

    g = torch.Generator(device="cuda").manual_seed(9)

    def sync_cmd(binary):
        return [binary, "sync", "--model-dir", ours, "--handles", handles, "--json",
                "--gpu-memory", f"{args.gpu_memory_mib}MiB"] + (["-vv"] if args.verbose else [])

    # Each tool under test: (name, command, resident process or None).
    tools = [("ours", sync_cmd(args.bin), None)]
    if args.baseline:
        tools.append(("baseline", sync_cmd(args.baseline), None))
    if args.resident:
        tools = [(name, cmd, Resident(cmd, os.path.join(work, f"resident-{name}.log"))) for name, cmd, _ in tools]
        for name, _, res in tools:
            log(f"resident {name}: pid {res.p.pid}, first sync {res.first.get('seconds')} s")

    def change(kind, round_no):
        with torch.no_grad():
            if kind == "tensors":
                largest = sorted(model, key=lambda n: -model[n][0].numel())[:3]
                for name in largest:
                    t = model[name][0]
                    t.copy_(torch.empty_like(t, dtype=torch.float32).normal_(0, 0.02, generator=g).to(t.dtype))
                return
            for t, _ in model.values():
                flat = t.view(-1)
                per_block = 4096 // t.element_size()
                if kind == "sparse":
                    flat[(round_no * 7) % per_block::per_block * 200] += 0.01
                elif kind == "dense":
                    flat[(round_no * 5) % per_block::per_block] += 0.01
                elif kind == "elements":
                    mask = torch.rand(flat.shape, device="cuda", generator=g) < 0.01
                    flat[mask] += 0.01
        torch.cuda.synchronize()

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    rows = {}
    for i, kind in enumerate(KINDS):
        if kind not in args.changes.split(","):
            continue
        # Ours --repeat times, each after a fresh change of this kind (the same live state the
        # prototype then syncs), then the prototype once: it reads everything every time.
        every = {name: [] for name, _, _ in tools}
        for r in range(args.repeat):
            for t, (name, cmd, res) in enumerate(tools):
                if kind != "nothing":
                    change(kind, i * 100 + r * len(tools) + t)
                os.sync()
                if res:
                    wall, rep, code, rss, err = res.sync()
                    rep = rep if code == 0 else {}
                else:
                    wall, out, err, code, rss = timed(cmd)
                    rep = json.loads(out) if code == 0 else {}
                if code != 0:
                    log(f"{kind}: {name} failed ({code}): {err}")
                every[name].append((wall, rep, code, rss))
                for line in err.splitlines():
                    if args.verbose or line.startswith("PROFILE"):
                        log(line)
                log(f"{kind} #{r + 1}: {name} {wall:.3f} s; outside sync {wall - rep.get('seconds', 0):.3f} s; "
                    f"{json.dumps(rep.get('phases'))}")
        runs = every["ours"]
        os.sync()
        pwall, pout, perr, pcode, prss = timed([sys.executable, args.prototype, "sync", "--model-dir", proto,
                                                "--handles", legacy])
        if pcode != 0:
            log(f"{kind}: prototype failed ({pcode}): {perr[-2000:]}")
        same = identical(ours, proto)
        scale = PER_54GB / total
        wall = median([w for w, _, _, _ in runs])
        _, rep, code, rss = next(x for x in runs if x[0] == wall)
        rows[kind] = {
            "ours_s": round(wall, 3),
            "ours_runs_s": [round(w, 3) for w, _, _, _ in runs],
            "prototype_s": round(pwall, 3),
            "speedup": round(pwall / wall, 1) if wall else None,
            "ours_per_54gb_s": round(wall * scale, 3),
            "prototype_per_54gb_s": round(pwall * scale, 2),
            "files_identical": same,
            "ours_exit": max(c for _, _, c, _ in runs),
            "outside_sync_s": round(wall - rep.get("seconds", 0), 3),
            "phases_s": rep.get("phases"),
            "gpu_bytes_copied": rep.get("gpu_bytes_copied"),
            "gpu_copies": rep.get("gpu_copies"),
            "recaptured_blocks": rep.get("recaptured_blocks"),
            "blocks_changed": rep.get("blocks_changed"),
            "disk_bytes_read": rep.get("model_bytes_read"),
            "disk_bytes_written": rep.get("bytes_changed"),
            "journal_bytes": rep.get("journal_bytes"),
            "ours_peak_anon_rss": max(x for _, _, _, x in runs),
            "prototype_peak_anon_rss": prss,
        }
        if "baseline" in every:
            base = every["baseline"]
            bwall = median([w for w, _, _, _ in base])
            _, brep, _, _ = next(x for x in base if x[0] == bwall)
            rows[kind].update({
                "baseline_s": round(bwall, 3),
                "baseline_runs_s": [round(w, 3) for w, _, _, _ in base],
                "baseline_vs_ours": round(bwall / wall, 3) if wall else None,
                "baseline_exit": max(c for _, _, c, _ in base),
                "baseline_phases_s": brep.get("phases"),
                "baseline_peak_anon_rss": max(x for _, _, _, x in base),
            })
        log(f"{kind}: ours median {wall:.3f} s, prototype {pwall:.2f} s, identical {same}")
    for _, _, res in tools:
        if res:
            res.stop()
    print(json.dumps({
        "machine": {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count()},
        "host": host,
        "ours": "resident (sync --every, SIGUSR1 per sync)" if args.resident else "one process per sync",
        "baseline": args.baseline,
        "model_bytes": total,
        "layers": args.layers,
        "gpu_memory_allocated_by_tool": 9 * (args.gpu_memory_mib // 9) * MIB,
        "rows": rows,
    }, indent=1))
    subprocess.run(["rm", "-rf", work])
    return 0


def host_info(directory, page_writes):
    """The kernel, the filesystem of `directory` and, with `page_writes`, its probe's JSON."""
    info = {"kernel": os.uname().release}
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", directory],
                        capture_output=True, text=True)
    info["filesystem"] = fs.stdout.strip() if fs.returncode == 0 else None
    if page_writes:
        log("measuring scattered page-cache writes (examples/page_writes)")
        out = subprocess.run([page_writes, directory], capture_output=True, text=True, check=True)
        info["page_writes_us"] = json.loads(out.stdout)
    return info


if __name__ == "__main__":
    sys.exit(main())
