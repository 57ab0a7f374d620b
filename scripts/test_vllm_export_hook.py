#!/usr/bin/env python3
"""Tests of the export hook's layout facts against mock vLLM modules (no torch, no vLLM needed).

The mocks copy what the facts are read from in vLLM (vllm/model_executor/layers/linear.py,
vocab_parallel_embedding.py, mamba/gdn_linear_attn.py, model_loader/weight_utils.py): class
names and hierarchy, tp_rank/tp_size, output_sizes, QKV head counts, vocabulary shard indices,
and the shard specs captured by weight-loader closures. Run: python3 scripts/test_vllm_export_hook.py

The second half writes manifests of mock module trees (a Qwen3.5 vision-language model with a
vision tower, text-only naming, pipeline parallel 2 x tensor parallel 2, a FusedMoE layer under
tensor and expert parallelism, tied embeddings) with the hook and runs the built binary's
`diagnose --json` on them against model files with the checkpoint's names.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_export_hook as hook  # noqa: E402


class Param:
    def __init__(self, *shape, **attrs):
        self.shape = tuple(shape)
        for k, v in attrs.items():
            setattr(self, k, v)


class Module:
    def __init__(self, **children):
        self._children = {k: v for k, v in children.items() if isinstance(v, Module)}
        self._params = {k: v for k, v in children.items() if isinstance(v, Param)}

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, recurse=True):
        """Like torch: every parameter once (the first name of a tied one)."""
        if not recurse:
            yield from self._params.items()
            return
        seen = set()
        for module_name, module in self.named_modules():
            for name, p in module._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{module_name}.{name}" if module_name else name), p


class LinearBase(Module):
    def __init__(self, tp_rank, tp_size, **kw):
        super().__init__(**kw)
        self.tp_rank, self.tp_size = tp_rank, tp_size


class ColumnParallelLinear(LinearBase):
    pass


class MergedColumnParallelLinear(ColumnParallelLinear):
    pass


class QKVParallelLinear(ColumnParallelLinear):
    pass


class RowParallelLinear(LinearBase):
    pass


class VocabParallelEmbedding(Module):
    pass


class ParallelLMHead(VocabParallelEmbedding):
    pass


class ShardIndices:
    def __init__(self, start, end):
        self.org_vocab_start_index, self.org_vocab_end_index = start, end
        self.added_vocab_start_index = self.added_vocab_end_index = end


def sharded_weight_loader(shard_axis):
    def loader(param, loaded_weight):
        return shard_axis

    return loader


def mamba_v2_sharded_weight_loader(shard_spec, tp_size, tp_rank):
    def loader(param, loaded_weight):
        return shard_spec, tp_size, tp_rank

    return loader


def column(r, tp, rows, cols):
    return Param(rows // tp, cols, output_dim=0, input_dim=1)


class FusedMoE(Module):
    pass


class WeightsMapper:
    def __init__(self, orig_to_new_prefix):
        self.orig_to_new_prefix = orig_to_new_prefix
        self.orig_to_new_substr, self.orig_to_new_suffix = {}, {}


def moe_block(r, tp, experts=4, inter=16, hidden=32, ep=1):
    """A FusedMoE layer as vLLM builds it: at tp > 1 every rank holds every expert's slice of the
    intermediate dimension; with expert parallelism (ep > 1) the layer's own tp is 1 and rank r
    holds experts [r·E/ep, (r+1)·E/ep), said by its expert_map (global id -> local id or -1)."""
    if ep > 1:
        local = experts // ep
        moe = FusedMoE(w13_weight=Param(local, 2 * inter, hidden), w2_weight=Param(local, hidden, inter))
        moe.tp_rank, moe.tp_size = 0, 1
        moe.expert_map = [g - r * local if r * local <= g < (r + 1) * local else -1 for g in range(experts)]
    else:
        moe = FusedMoE(w13_weight=Param(experts, 2 * inter // tp, hidden), w2_weight=Param(experts, hidden, inter // tp))
        moe.tp_rank, moe.tp_size = r, tp
        moe.expert_map = None
    moe.local_num_experts, moe.global_num_experts = experts // ep, experts
    shared = MergedColumnParallelLinear(r, tp, weight=column(r, tp, 2 * 8, hidden))
    shared.output_sizes = [8, 8]
    return Module(experts=moe, gate=Module(weight=Param(experts, hidden)),
                  shared_expert=Module(gate_up_proj=shared,
                                       down_proj=RowParallelLinear(r, tp, weight=Param(hidden, 8 // tp, output_dim=0, input_dim=1))))


def vision_tower(r, tp, hidden=16, heads=2, head=8):
    """A vision tower's block: attention fused as `qkv` (a QKVParallelLinear absent from
    packed_modules_mapping), `proj` row-parallel, a norm."""
    qkv = QKVParallelLinear(r, tp)
    qkv.head_size = qkv.v_head_size = head
    qkv.total_num_heads = qkv.total_num_kv_heads = heads
    qkv.num_heads = qkv.num_kv_heads = heads // tp
    qkv._params["weight"] = Param(3 * heads * head // tp, hidden, output_dim=0, input_dim=1)
    attn = Module(qkv=qkv, proj=RowParallelLinear(r, tp, weight=Param(hidden, heads * head // tp, output_dim=0, input_dim=1)))
    return Module(blocks=Module(**{"0": Module(attn=attn, norm1=Module(weight=Param(hidden)))}))


def qwen35_rank(r, tp, vocab=250, hidden=32, heads=4, kv_heads=2, head=8, key=16, value=32, v_heads=4,
                naming="vl", stage=None, moe=None, tied=False, vision=True):
    """One rank of a small Qwen3.5-shaped vLLM model: one full-attention layer, one GDN layer.

    naming "vl": vLLM's vision-language class (language_model.model.*, language_model.lm_head,
    a vision tower, its hf_to_vllm_mapper); "text": a text-only class (model.*, lm_head). stage
    (pp rank, pp size): that pipeline stage only (layer i on stage i·pp/2; embeddings first,
    norm and lm_head last). moe (ep): layer 0's MLP is a FusedMoE layer with shared expert.
    tied: lm_head is embed_tokens (one parameter, two names)."""
    qkv = QKVParallelLinear(r, tp)
    qkv.head_size = qkv.v_head_size = head
    qkv.total_num_heads, qkv.total_num_kv_heads = 2 * heads, kv_heads  # gated q: twice the heads
    qkv.num_heads = 2 * heads // tp
    qkv.num_kv_heads = max(kv_heads // tp, 1)
    qkv.num_kv_head_replicas = max(tp // kv_heads, 1)
    qkv._params["weight"] = Param((qkv.num_heads + 2 * qkv.num_kv_heads) * head, hidden, output_dim=0, input_dim=1)
    attn = Module(qkv_proj=qkv, o_proj=RowParallelLinear(r, tp, weight=Param(hidden, heads * head // tp, output_dim=0, input_dim=1)))
    qkvz = MergedColumnParallelLinear(r, tp, weight=column(r, tp, 2 * key + 2 * value, hidden))
    qkvz.output_sizes = [key, key, value, value]
    ba = MergedColumnParallelLinear(r, tp, weight=column(r, tp, 2 * v_heads, hidden))
    ba.output_sizes = [v_heads, v_heads]
    conv = ColumnParallelLinear(r, tp, weight=Param((2 * key + value) // tp, 1, 4, output_dim=0, input_dim=1,
                                                    weight_loader=mamba_v2_sharded_weight_loader([(key, 0, False), (key, 0, False), (value, 0, False)], tp, r)))
    gdn = Module(in_proj_qkvz=qkvz, in_proj_ba=ba, conv1d=conv,
                 A_log=Param(v_heads // tp, weight_loader=sharded_weight_loader(0)),
                 dt_bias=Param(v_heads // tp, weight_loader=sharded_weight_loader(0)),
                 norm=Module(weight=Param(value // v_heads)),
                 out_proj=RowParallelLinear(r, tp, weight=Param(hidden, value // tp, output_dim=0, input_dim=1)))
    gdn.tp_rank, gdn.tp_size = r, tp
    gate_up = MergedColumnParallelLinear(r, tp, weight=column(r, tp, 2 * 64, hidden))
    gate_up.output_sizes = [64, 64]
    mlp = Module(gate_up_proj=gate_up, down_proj=RowParallelLinear(r, tp, weight=Param(hidden, 64 // tp, output_dim=0, input_dim=1)))
    padded = -(-vocab // 64) * 64
    per = padded // tp
    embed = VocabParallelEmbedding(weight=Param(per, hidden, output_dim=0))
    embed.tp_size, embed.org_vocab_size = tp, vocab
    embed.shard_indices = ShardIndices(r * per, min((r + 1) * per, vocab))
    head_ = ParallelLMHead(weight=Param(per, hidden, output_dim=0))
    head_.tp_size, head_.org_vocab_size = tp, vocab
    head_.shard_indices = ShardIndices(r * per, min((r + 1) * per, vocab))
    if moe is not None:
        mlp = moe_block(r, tp, hidden=hidden, ep=moe)
    if tied:
        head_ = embed
    pp_rank, pp_size = stage or (0, 1)
    on = lambda layer: layer * pp_size // 2 == pp_rank  # noqa: E731
    layers = {}
    if on(0):
        layers["0"] = Module(self_attn=attn, mlp=mlp, input_layernorm=Module(weight=Param(hidden)))
    if on(1):
        layers["1"] = Module(linear_attn=gdn)
    inner = {"layers": Module(**layers)}
    outer = {}
    if pp_rank == 0:
        inner["embed_tokens"] = embed
    if pp_rank == pp_size - 1:
        inner["norm"] = Module(weight=Param(hidden))
        outer["lm_head"] = head_
    if naming == "vl":
        model = Module(language_model=Module(model=Module(**inner), **outer),
                       **({"visual": vision_tower(r, tp)} if vision and pp_rank == 0 else {}))
        model.hf_to_vllm_mapper = WeightsMapper({"model.visual.": "visual.", "lm_head.": "language_model.lm_head.",
                                                 "model.language_model.": "language_model.model."})
    else:
        model = Module(model=Module(**inner), **outer)
    model.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
        "in_proj_qkvz": ["in_proj_qkv", "in_proj_z"], "in_proj_ba": ["in_proj_b", "in_proj_a"],
    }
    return model


P = "language_model.model.layers"


class LayoutFacts(unittest.TestCase):
    def facts(self, r, tp, **kw):
        return hook.layout_facts(qwen35_rank(r, tp, **kw), r, tp)

    def test_unsharded_model(self):
        f = self.facts(0, 1)
        qkv = f[f"{P}.0.self_attn.qkv_proj.weight"]
        self.assertEqual(qkv["packed"], "qkv_proj")
        self.assertEqual([(p["name"], p["rows"], p["local_rows"], p["first_row"]) for p in qkv["parts"]],
                         [("q_proj", 64, 64, 0), ("k_proj", 16, 16, 0), ("v_proj", 16, 16, 0)])
        self.assertIsNone(qkv["shard_dim"])
        qkvz = f[f"{P}.1.linear_attn.in_proj_qkvz.weight"]
        self.assertEqual(qkvz["names"], ["in_proj_qkv", "in_proj_z"])
        self.assertEqual([p["rows"] for p in qkvz["pieces"]], [16, 16, 32, 32])
        self.assertIsNone(f[f"{P}.1.linear_attn.out_proj.weight"]["shard_dim"])
        self.assertIsNone(f[f"{P}.1.linear_attn.A_log"]["shard_dim"])
        # 250 rows padded to 256: six padding rows that belong to no HF tensor.
        emb = f["language_model.model.embed_tokens.weight"]
        self.assertEqual(emb["parts"], [{"name": "embed_tokens", "rows": 250, "local_rows": 250, "first_row": 0},
                                        {"name": "", "rows": 6, "local_rows": 6, "first_row": 0}])

    def test_tensor_parallel_ranks(self):
        f = self.facts(1, 2)
        qkv = f[f"{P}.0.self_attn.qkv_proj.weight"]
        self.assertEqual([(p["local_rows"], p["first_row"]) for p in qkv["parts"]], [(32, 32), (8, 8), (8, 8)])
        self.assertEqual(qkv["shard_dim"], 0)
        self.assertEqual(f[f"{P}.0.self_attn.o_proj.weight"]["shard_dim"], 1)
        self.assertEqual(f[f"{P}.0.mlp.down_proj.weight"]["shard_dim"], 1)
        gu = f[f"{P}.0.mlp.gate_up_proj.weight"]
        self.assertEqual(gu["pieces"], [{"rows": 64, "local_rows": 32, "first_row": 32}] * 2)
        conv = f[f"{P}.1.linear_attn.conv1d.weight"]
        self.assertEqual((conv["packed"], conv["names"], conv["shard_dim"]), ("conv1d", ["conv1d"], 0))
        self.assertEqual([(p["rows"], p["local_rows"], p["first_row"]) for p in conv["pieces"]], [(16, 8, 8), (16, 8, 8), (32, 16, 16)])
        self.assertEqual(f[f"{P}.1.linear_attn.A_log"]["shard_dim"], 0)
        self.assertEqual(f[f"{P}.1.linear_attn.dt_bias"]["shard_dim"], 0)
        self.assertIsNone(f[f"{P}.1.linear_attn.norm.weight"]["shard_dim"])
        self.assertIsNone(f[f"{P}.0.input_layernorm.weight"]["shard_dim"])
        # Rank 1 of 2 holds vocabulary rows 128..250, then 6 padding rows.
        head = f["language_model.lm_head.weight"]
        self.assertEqual(head["parts"][0], {"name": "lm_head", "rows": 250, "local_rows": 122, "first_row": 128})
        self.assertEqual(head["parts"][1]["local_rows"], 6)

    def test_kv_heads_replicated_when_tp_exceeds_them(self):
        # 2 KV heads over 4 ranks: ranks 2 and 3 both hold KV head 1.
        for r, kv_head in [(0, 0), (1, 0), (2, 1), (3, 1)]:
            qkv = self.facts(r, 4)[f"{P}.0.self_attn.qkv_proj.weight"]
            k = qkv["parts"][1]
            self.assertEqual((k["rows"], k["local_rows"], k["first_row"]), (16, 8, 8 * kv_head))

    def test_a_qkv_layer_absent_from_the_mapping_stays_fused(self):
        # The vision tower's attn.qkv: one HF tensor, its q, k, v blocks sharded separately.
        qkv = self.facts(1, 2)["visual.blocks.0.attn.qkv.weight"]
        self.assertEqual((qkv["packed"], qkv["names"]), ("qkv", ["qkv"]))
        self.assertEqual([(p["rows"], p["local_rows"], p["first_row"]) for p in qkv["pieces"]], [(16, 8, 8)] * 3)

    def test_fused_moe_experts(self):
        f = self.facts(1, 2, moe=1)
        w13 = f[f"{P}.0.mlp.experts.w13_weight"]
        self.assertEqual((w13["tp_rank"], w13["tp_size"], w13["experts"]),
                         (1, 2, {"kind": "w13", "experts": [0, 1, 2, 3], "num_experts": 4}))
        # Expert parallelism: rank 1 of 2 holds experts 2 and 3; the layer's own tp is 1.
        w2 = self.facts(1, 2, moe=2)[f"{P}.0.mlp.experts.w2_weight"]
        self.assertEqual((w2["tp_rank"], w2["tp_size"], w2["experts"]), (0, 1, {"kind": "w2", "experts": [2, 3], "num_experts": 4}))

    def test_sleep_mode_and_memory_cuda_ipc_cannot_share_are_refused(self):
        class Config:
            enable_sleep_mode = True
            model = "m"
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(hook.ExportError) as e:
                hook.export_model(qwen35_rank(0, 1), d, model_config=Config(), entry=fake_entry)
            self.assertIn("--enable-sleep-mode", str(e.exception))
            self.assertEqual(os.listdir(d), [])

    def test_packed_module_without_a_mapping_is_refused(self):
        model = qwen35_rank(0, 1)
        del model.packed_modules_mapping["in_proj_ba"]
        with self.assertRaises(hook.ExportError) as e:
            hook.layout_facts(model)
        self.assertIn("packed_modules_mapping", str(e.exception))

    def test_config_meta_and_manifest_file(self):
        class Cfg:
            architectures = ["Qwen3_5ForConditionalGeneration"]
            hidden_size = None

        class Text:
            hidden_size, num_hidden_layers, vocab_size = 5120, 64, 248320

        self.assertEqual(hook.config_meta(Cfg(), Text()),
                         {"architectures": ["Qwen3_5ForConditionalGeneration"], "hidden_size": 5120,
                          "num_hidden_layers": 64, "vocab_size": 248320})
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "handles-rank0.json")
            hook.write_entries(path, [{"name": "x"}], meta={"tp_rank": 0})
            with open(path) as f:
                doc = json.load(f)
            self.assertEqual((doc["format"], doc["version"], doc["meta"]["tp_rank"]), ("apollo-checkpoint-handles", 1, 0))
            self.assertEqual(os.listdir(d), ["handles-rank0.json"])  # no temporary file left

    def test_expandable_segments_refused(self):
        old = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        try:
            with self.assertRaises(hook.ExportError):
                hook.check_allocator()
        finally:
            if old is None:
                del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
            else:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = old


def fake_entry(name, param, layout):
    """A manifest entry for a mock parameter: what the hook writes, without a GPU."""
    entry = {"name": name, "dtype": "BF16", "shape": list(param.shape), "strides": [], "nbytes": 2 * prod(param.shape),
             "device": 0, "device_uuid": "GPU-mock", "ipc_handle": "00" * 64, "offset": 0, "allocation_bytes": 0,
             "pid": None}
    if layout:
        entry["layout"] = layout
    return entry


def prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors(path, shapes):
    """A safetensors file of zero bf16 tensors {name: shape}."""
    header, offset = {}, 0
    for name in sorted(shapes):
        n = 2 * prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(offset))


def hf_shapes(prefix="model.language_model.", vision=True, moe=False, tied=False, hidden=32, vocab=250):
    """The checkpoint's tensors (HF names and shapes) of the model qwen35_rank builds."""
    a, g, m = f"{prefix}layers.0.self_attn", f"{prefix}layers.1.linear_attn", f"{prefix}layers.0.mlp"
    out = {
        f"{a}.q_proj.weight": (64, hidden), f"{a}.k_proj.weight": (16, hidden), f"{a}.v_proj.weight": (16, hidden),
        f"{a}.o_proj.weight": (hidden, 32), f"{prefix}layers.0.input_layernorm.weight": (hidden,),
        f"{g}.in_proj_qkv.weight": (64, hidden), f"{g}.in_proj_z.weight": (32, hidden),
        f"{g}.in_proj_b.weight": (4, hidden), f"{g}.in_proj_a.weight": (4, hidden),
        f"{g}.conv1d.weight": (64, 1, 4), f"{g}.A_log": (4,), f"{g}.dt_bias": (4,), f"{g}.norm.weight": (8,),
        f"{g}.out_proj.weight": (hidden, 32),
        f"{prefix}embed_tokens.weight": (vocab, hidden), f"{prefix}norm.weight": (hidden,), "lm_head.weight": (vocab, hidden),
        "mtp.fc.weight": (hidden, 2 * hidden),  # the engine does not load it: left untouched
    }
    if moe:
        for e in range(4):
            out.update({f"{m}.experts.{e}.gate_proj.weight": (16, hidden), f"{m}.experts.{e}.up_proj.weight": (16, hidden),
                        f"{m}.experts.{e}.down_proj.weight": (hidden, 16)})
        out.update({f"{m}.gate.weight": (4, hidden), f"{m}.shared_expert.gate_proj.weight": (8, hidden),
                    f"{m}.shared_expert.up_proj.weight": (8, hidden), f"{m}.shared_expert.down_proj.weight": (hidden, 8)})
    else:
        out.update({f"{m}.gate_proj.weight": (64, hidden), f"{m}.up_proj.weight": (64, hidden), f"{m}.down_proj.weight": (hidden, 64)})
    if vision:
        v = "model.visual.blocks.0"
        out.update({f"{v}.attn.qkv.weight": (48, 16), f"{v}.attn.proj.weight": (16, 16), f"{v}.norm1.weight": (16,)})
    if tied:
        del out["lm_head.weight"]
    return out


BINARY = os.environ.get("APOLLO_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")),
    "release", "apollo-checkpoint")


# scripts/test.sh sets APOLLO_BIN: there a missing binary fails these tests instead of skipping them.
@unittest.skipUnless(os.path.exists(BINARY) or "APOLLO_BIN" in os.environ,
                     f"no built binary at {BINARY} (cargo build --release, or set APOLLO_BIN)")
class ThroughDiagnose(unittest.TestCase):
    """Mock vLLM module trees -> the hook's manifests -> `apollo-checkpoint diagnose --json`."""

    def diagnose(self, shapes, ranks, drop=(), stale=(), **model_kw):
        """Writes the model files and one manifest per (tp, tp_size, pp, pp_size) rank; returns
        (exit code, diagnose's JSON, stderr)."""
        with tempfile.TemporaryDirectory() as d:
            model_dir, handles = os.path.join(d, "model"), os.path.join(d, "handles")
            os.makedirs(model_dir)
            os.makedirs(handles)
            write_safetensors(os.path.join(model_dir, "model.safetensors"), shapes)
            for tp, tp_size, pp, pp_size in ranks:
                model = qwen35_rank(tp, tp_size, stage=(pp, pp_size), **model_kw)
                export_id = "old" if (pp, tp) in stale else "e1"
                path = hook.export_model(model, handles, (tp, tp_size, pp, pp_size), export_id=export_id, entry=fake_entry)
                self.assertEqual(os.path.basename(path), f"handles-pp{pp}-tp{tp}.json")
            for name in drop:
                os.unlink(os.path.join(handles, name))
            o = subprocess.run([BINARY, "diagnose", "--model-dir", model_dir, "--handles", handles, "--json"],
                               capture_output=True, text=True)
            return o.returncode, (json.loads(o.stdout) if o.stdout.strip() else None), o.stderr

    def assert_all_matched(self, shapes, ranks, **model_kw):
        code, d, err = self.diagnose(shapes, ranks, **model_kw)
        self.assertEqual(code, 0, (err, d))
        self.assertTrue(d["ok"])
        self.assertEqual((d["live_only"], d["mismatched"], d["unmatched"]), ([], [], []))
        self.assertEqual(d["disk_only"], ["mtp.fc.weight"])
        self.assertEqual(sorted(d["matched"]), sorted(n for n in shapes if n != "mtp.fc.weight"))
        return d

    def test_vision_language_files_with_vllm_vision_language_names(self):
        for tp in (1, 2):
            d = self.assert_all_matched(hf_shapes(), [(r, tp, 0, 1) for r in range(tp)])
            self.assertEqual(d["notes"], [])

    def test_text_only_files_with_vision_language_or_text_only_engine_names(self):
        shapes = hf_shapes(prefix="model.", vision=False)
        # The original prototype's deployment: vLLM's VL wrapper names, text-only files.
        self.assert_all_matched(shapes, [(r, 2, 0, 1) for r in range(2)], naming="vl", vision=False)
        self.assert_all_matched(shapes, [(0, 1, 0, 1)], naming="text")

    def test_vision_language_files_with_a_text_only_engine(self):
        self.assert_all_matched(hf_shapes(vision=False), [(0, 1, 0, 1)], naming="text")

    def test_tied_lm_head_with_and_without_a_copy_in_the_files(self):
        # The files hold lm_head.weight too: it is written from the embedding's live weights.
        self.assert_all_matched(hf_shapes(), [(r, 2, 0, 1) for r in range(2)], tied=True)
        # The files hold the embedding only.
        self.assert_all_matched(hf_shapes(tied=True), [(r, 2, 0, 1) for r in range(2)], tied=True)

    def test_pipeline_parallel_two_stages_by_two_ranks(self):
        ranks = [(tp, 2, pp, 2) for pp in range(2) for tp in range(2)]
        self.assert_all_matched(hf_shapes(), ranks)
        code, _, err = self.diagnose(hf_shapes(), ranks, drop=["handles-pp1-tp1.json"])
        self.assertEqual(code, 65, err)
        self.assertIn("missing pp1-tp1", err)
        # A manifest left from an earlier export: a mixed set.
        code, _, err = self.diagnose(hf_shapes(), ranks, stale=[(1, 0)])
        self.assertEqual(code, 65, err)
        self.assertIn("a mixed set", err)

    def test_fused_moe_with_tensor_or_expert_parallelism(self):
        shapes = hf_shapes(moe=True)
        for ep in (1, 2):
            self.assert_all_matched(shapes, [(r, 2, 0, 1) for r in range(2)], moe=ep)

    def test_unmatched_names_fail_with_the_closest_names(self):
        shapes = hf_shapes()
        shapes["model.language_model.layers.0.mlp.up_proj.w"] = shapes.pop("model.language_model.layers.0.mlp.up_proj.weight")
        code, d, _ = self.diagnose(shapes, [(0, 1, 0, 1)])
        self.assertEqual(code, 1)
        self.assertFalse(d["ok"])
        [u] = d["unmatched"]
        self.assertEqual(u["engine_name"], "language_model.model.layers.0.mlp.up_proj.weight")
        self.assertIn("model.language_model.layers.0.mlp.up_proj.w", u["closest"])


@unittest.skipUnless(os.path.exists(BINARY) or "APOLLO_BIN" in os.environ,
                     f"no built binary at {BINARY} (cargo build --release, or set APOLLO_BIN)")
class InstalledPackage(unittest.TestCase):
    """`pip install ./scripts` as an operator runs it, then the installed hook and converter used
    from elsewhere (not from this source tree), and the binary reading what the hook wrote."""

    def test_pip_install_then_export_convert_and_check_the_format_version(self):
        scripts = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory() as d:
            # Built from a copy, so that the build leaves nothing in the source tree.
            src, site = os.path.join(d, "src"), os.path.join(d, "site")
            os.makedirs(src)
            for name in ("pyproject.toml", "vllm_export_hook.py", "convert_legacy_handles.py"):
                with open(os.path.join(scripts, name)) as f, open(os.path.join(src, name), "w") as g:
                    g.write(f.read())
            o = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                "--target", site, src], capture_output=True, text=True)
            self.assertEqual(o.returncode, 0, o.stdout + o.stderr)
            env = dict(os.environ, PYTHONPATH=site)

            def python(code):
                o = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True)
                self.assertEqual(o.returncode, 0, o.stderr)
                return o.stdout

            files = python("import vllm_export_hook as h, convert_legacy_handles as c; print(h.__file__); print(c.__file__)")
            for f in files.split():
                self.assertTrue(f.startswith(site), f"{f} was not imported from the installed package")
            self.assertEqual(python("import vllm_export_hook as h; print(h.__version__)").strip(), hook.__version__)
            # The installed hook writes a manifest the binary reads.
            model_dir, manifest = os.path.join(d, "model"), os.path.join(d, "handles-pp0-tp0.json")
            os.makedirs(model_dir)
            write_safetensors(os.path.join(model_dir, "model.safetensors"), {"w": (4, 4)})
            entry = fake_entry("w", Param(4, 4), None)
            python(f"import vllm_export_hook as h; h.write_entries({manifest!r}, [{entry!r}], {{'export_id': 'e1'}})")
            with open(manifest) as f:
                doc = json.load(f)
            self.assertEqual(doc["writer"], f"apollo-checkpoint-hook {hook.__version__}")
            o = subprocess.run([BINARY, "diagnose", "--model-dir", model_dir, "--handles", manifest, "--json"],
                               capture_output=True, text=True)
            self.assertEqual(o.returncode, 0, o.stderr)
            self.assertEqual(json.loads(o.stdout)["matched"], ["w"])
            # A manifest of the next format version, as a newer hook would write it: refused,
            # naming both releases.
            doc["version"] += 1
            doc["writer"] = "apollo-checkpoint-hook 99.0.0"
            with open(manifest, "w") as f:
                json.dump(doc, f)
            o = subprocess.run([BINARY, "diagnose", "--model-dir", model_dir, "--handles", manifest],
                               capture_output=True, text=True)
            self.assertEqual(o.returncode, 78, o.stderr)
            self.assertIn(f"manifest format version {doc['version']}, written by apollo-checkpoint-hook 99.0.0", o.stderr)
            self.assertIn(f"reads version {hook.MANIFEST_VERSION}", o.stderr)
            # The converter's command: usage, and a file that is not the prototype's archive.
            converter = os.path.join(site, "bin", "apollo-convert-legacy-handles")
            o = subprocess.run([converter, "--help"], cwd=d, env=env, capture_output=True, text=True)
            self.assertEqual(o.returncode, 0, o.stderr)
            self.assertIn("apollo-convert-legacy-handles OLD", o.stdout.replace("/tmp/vllm_weight_handles.pt", "OLD"))
            with open(os.path.join(d, "bogus.pt"), "wb") as f:
                f.write(b"\x80\x04not a pickle of handles")
            o = subprocess.run([converter, os.path.join(d, "bogus.pt"), os.path.join(d, "out.json")],
                               cwd=d, env=env, capture_output=True, text=True)
            self.assertEqual(o.returncode, 1, o.stdout + o.stderr)
            self.assertIn("convert_legacy_handles:", o.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, "out.json")))


if __name__ == "__main__":
    unittest.main()
