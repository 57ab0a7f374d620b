#!/usr/bin/env python3
"""Tests of the export hook's layout facts against mock vLLM modules (no torch, no vLLM needed).

The mocks copy what the facts are read from in vLLM (vllm/model_executor/layers/linear.py,
vocab_parallel_embedding.py, mamba/gdn_linear_attn.py, model_loader/weight_utils.py): class
names and hierarchy, tp_rank/tp_size, output_sizes, QKV head counts, vocabulary shard indices,
and the shard specs captured by weight-loader closures. Run: python3 scripts/test_vllm_export_hook.py
"""

import json
import os
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
        yield from self._params.items()


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


def qwen35_rank(r, tp, vocab=250, hidden=32, heads=4, kv_heads=2, head=8, key=16, value=32, v_heads=4):
    """One rank of a small Qwen3.5-shaped vLLM model: one full-attention layer, one GDN layer."""
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
    layers = Module(**{"0": Module(self_attn=attn, mlp=mlp, input_layernorm=Module(weight=Param(hidden))),
                       "1": Module(linear_attn=gdn)})
    model = Module(language_model=Module(model=Module(embed_tokens=embed, layers=layers), lm_head=head_))
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


if __name__ == "__main__":
    unittest.main()
