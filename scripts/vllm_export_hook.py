"""Export CUDA IPC handles of live weights as a JSON manifest, for `apollo-checkpoint`.

Runs inside the process that owns the weights (each vLLM worker). It never pickles anything: the
manifest is plain JSON, one per rank, written atomically (temporary file, fsync, rename), with for
every parameter its name, dtype, shape and strides, the GPU's UUID, the 64-byte CUDA IPC memory
handle of the allocation holding it (hex), the byte offset of the tensor inside that allocation,
and the owning pid. Several parameters usually share one allocation (one handle, other offsets).

The core, `manifest_entry`, works on plain PyTorch tensors. `write_manifest` writes a manifest
for any iterable of (name, tensor). `layout_facts` reads, from vLLM's modules, how each parameter
maps back to the HF tensors of the checkpoint (packed parts and their sizes, tensor-parallel rank
and size, the sharded dimension); it needs no torch and no vLLM import, only the modules'
classes and attributes, so mock modules test it. The vLLM integration (`ApolloExportExtension`, a
worker extension class for `--worker-extension-cls`, called through `collective_rpc`) joins the
two; it has been tested with mock modules and plain PyTorch tensors, not inside a vLLM server.

Memory that does not come from PyTorch's plain caching allocator cannot be shared through cudaIpc
handles: PyTorch's expandable segments and vLLM's sleep mode (`--enable-sleep-mode`, whose
CuMemAllocator maps weights with cuMemCreate). The hook refuses both with what to change: the
allocator setting, the sleep-mode flag, and, for every tensor, the driver's own answer
(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE).

A deployment writes one manifest per worker, `handles-pp{P}-tp{T}.json` (pipeline stage P,
tensor-parallel rank T), each carrying the same `export_id`, so that apollo-checkpoint can tell a
complete set of one export from a partial or mixed one.
"""

import ctypes
import json
import os
import tempfile
import uuid

# The apollo-checkpoint release this hook belongs to (the package's version, pyproject.toml), and
# the manifest format it writes. The binary reads manifests of its own format version only and
# names both when they differ; a test keeps them equal to Cargo.toml's version and the binary's
# MANIFEST_VERSION.
__version__ = "0.1.0"
MANIFEST_VERSION = 1
WRITER = f"apollo-checkpoint-hook {__version__}"

# safetensors' dtype names for torch dtypes.
_DTYPES = {
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.int16": "I16",
    "torch.int32": "I32",
    "torch.int64": "I64",
    "torch.bool": "BOOL",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
}


class ExportError(RuntimeError):
    """A tensor that cannot be exported, with what to do about it."""


def check_allocator():
    """Refuses PyTorch's expandable segments, whose memory cudaIpc handles cannot share."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        raise ExportError(
            "PyTorch's expandable_segments allocator is on; its memory cannot be shared through "
            "CUDA IPC handles. Start the server with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
        )


NOT_SHAREABLE = (
    "its memory was not allocated by PyTorch's plain caching allocator (vLLM's sleep mode and PyTorch's "
    "expandable segments map memory with cuMemCreate, which CUDA IPC handles cannot share); start vLLM "
    "without --enable-sleep-mode and with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
)

_LIBCUDA = []
# CUpointer_attribute CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE (cuda.h).
_IS_LEGACY_CUDA_IPC_CAPABLE = 10


def legacy_ipc_capable(ptr):
    """What the CUDA driver says of device pointer `ptr`: True if cudaIpcGetMemHandle can share
    its allocation, False if not (cuMemCreate memory: sleep mode, expandable segments), None if
    the driver cannot say (no libcuda, no context)."""
    if not _LIBCUDA:
        try:
            _LIBCUDA.append(ctypes.CDLL("libcuda.so.1"))
        except OSError:
            _LIBCUDA.append(None)
    lib = _LIBCUDA[0]
    if lib is None:
        return None
    value = ctypes.c_int(0)
    rc = lib.cuPointerGetAttribute(ctypes.byref(value), _IS_LEGACY_CUDA_IPC_CAPABLE, ctypes.c_uint64(ptr))
    return None if rc != 0 else bool(value.value)


def _ipc_handle(raw: bytes, name: str) -> bytes:
    """The 64-byte cudaIpcMemHandle_t inside torch's handle string (version and type prefix)."""
    if len(raw) == 64:  # older torch: the raw handle
        return raw
    if len(raw) == 66 and raw[1:2] == b"c":  # version byte, type 'c' (cudaMalloc), handle
        return raw[2:]
    if len(raw) >= 2 and raw[1:2] == b"e":
        raise ExportError(
            f"{name}: its memory comes from expandable segments, which CUDA IPC handles cannot share; "
            "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
        )
    raise ExportError(f"{name}: unknown CUDA IPC handle format ({len(raw)} bytes, type {raw[1:2]!r})")


def manifest_entry(name, tensor, layout=None):
    """The manifest entry of one CUDA tensor: where its bytes are and how to read them."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    if not tensor.is_cuda:
        raise ExportError(f"{name}: not on a CUDA device")
    if not tensor.is_contiguous():
        raise ExportError(f"{name}: not contiguous (strides {tuple(tensor.stride())}); export a contiguous tensor")
    dtype = _DTYPES.get(str(tensor.dtype))
    if dtype is None:
        raise ExportError(f"{name}: dtype {tensor.dtype} has no safetensors name")
    if tensor.numel() and legacy_ipc_capable(tensor.data_ptr()) is False:
        raise ExportError(f"{name}: {NOT_SHAREABLE}")
    try:
        _rebuild, args = reduce_tensor(tensor.detach())
    except RuntimeError as e:
        raise ExportError(f"{name}: PyTorch cannot share it ({e}); {NOT_SHAREABLE}") from e
    # args: (tensor_cls, size, stride, tensor_offset [elements], storage_cls, dtype, device,
    #        handle, storage_size_bytes, storage_offset_bytes, requires_grad, ...)
    tensor_offset, device, handle, storage_size, storage_offset = args[3], args[6], args[7], args[8], args[9]
    props = torch.cuda.get_device_properties(device)
    entry = {
        "name": name,
        "dtype": dtype,
        "shape": list(tensor.shape),
        "strides": list(tensor.stride()),
        "nbytes": tensor.numel() * tensor.element_size(),
        "device": int(device),
        "device_uuid": str(props.uuid),
        "ipc_handle": _ipc_handle(bytes(handle), name).hex(),
        "offset": int(storage_offset) + int(tensor_offset) * tensor.element_size(),
        "allocation_bytes": int(storage_offset) + int(storage_size),
        "pid": os.getpid(),
    }
    if layout:
        entry["layout"] = layout
    return entry


def write_manifest(path, named_tensors, meta=None, layouts=None):
    """Writes the manifest of `named_tensors` to `path` atomically; returns the entry count."""
    check_allocator()
    layouts = layouts or {}
    return write_entries(path, [manifest_entry(n, t, layouts.get(n)) for n, t in named_tensors], meta)


def write_entries(path, entries, meta=None):
    """Writes manifest entries to `path` atomically (temporary file, fsync, rename, fsync dir)."""
    doc = {"format": "apollo-checkpoint-handles", "version": MANIFEST_VERSION, "writer": WRITER,
           "meta": meta or {}, "tensors": entries}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".apollo-handles-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(entries)


def _classes(obj):
    return {c.__name__ for c in type(obj).__mro__}


def _closure(fn):
    """The variables a closure captured (vLLM's weight loaders keep their shard specs there)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    out = {}
    if code is not None:
        for name, cell in zip(code.co_freevars, cells):
            try:
                out[name] = cell.cell_contents
            except ValueError:
                pass
    return out


def _piece(total, tp_size, tp_rank):
    local = int(total) // tp_size
    return {"rows": int(total), "local_rows": local, "first_row": tp_rank * local}


def param_facts(module_name, module, param_name, param, packed_mapping, tp_rank=0, tp_size=1):
    """How one parameter of `module` maps back to HF tensors (see src/handles.rs for the format).

    Read from the module: its class (vLLM's parallel layers), `tp_rank`/`tp_size`,
    `output_sizes`, the QKV head counts and sizes, the vocabulary shard indices, and the shard
    specs captured by the parameter's weight loader; the packed parts' HF names come from the
    model's `packed_modules_mapping`.
    """
    full = f"{module_name}.{param_name}" if module_name else param_name
    classes = _classes(module)
    rank = int(getattr(module, "tp_rank", tp_rank))
    size = int(getattr(module, "tp_size", tp_size))
    sharded = 0 if size > 1 else None
    facts = {"tp_rank": rank, "tp_size": size, "shard_dim": None}
    short = module_name.rsplit(".", 1)[-1]
    loader = getattr(param, "weight_loader", None)
    loader_name = getattr(loader, "__qualname__", "") or ""
    if "mamba_v2_sharded_weight_loader" in loader_name:
        # GDN's conv1d: one HF tensor whose q, k, v row blocks are sharded separately.
        c = _closure(loader)
        rank, size = int(c.get("tp_rank", rank)), int(c.get("tp_size", size))
        pieces = []
        for full_dim, extra, duplicate in c.get("shard_spec", []):
            if extra or duplicate:
                raise ExportError(f"{full}: its shard spec replicates groups across ranks, which apollo-checkpoint does not map yet")
            pieces.append(_piece(full_dim, size, rank))
        facts.update(tp_rank=rank, tp_size=size, shard_dim=0 if size > 1 else None, packed=short, names=[short], pieces=pieces)
        return facts
    if "sharded_weight_loader" in loader_name:
        # Plain parameters split along one axis (GDN's A_log, dt_bias).
        axis = _closure(loader).get("shard_axis", 0)
        facts["shard_dim"] = int(axis) if size > 1 else None
        return facts
    if "FusedMoE" in classes:
        return _expert_facts(full, module, param_name, facts)
    if "VocabParallelEmbedding" in classes:  # ParallelLMHead too
        si = module.shard_indices
        if int(si.added_vocab_end_index) > int(si.added_vocab_start_index):
            raise ExportError(f"{full}: LoRA's added vocabulary is not in the checkpoint; export without LoRA")
        start, end = int(si.org_vocab_start_index), int(si.org_vocab_end_index)
        local = int(param.shape[0])
        parts = [{"name": short, "rows": int(module.org_vocab_size), "local_rows": end - start, "first_row": start}]
        if local > end - start:  # padding to a multiple of 64 rows
            pad = local - (end - start)
            parts.append({"name": "", "rows": pad, "local_rows": pad, "first_row": 0})
        facts.update(shard_dim=sharded, packed=short, parts=parts)
        return facts
    if "RowParallelLinear" in classes:
        if size > 1 and getattr(param, "input_dim", None) is not None:
            facts["shard_dim"] = int(param.input_dim)
        return facts
    if "ColumnParallelLinear" in classes:  # QKV and merged ones too
        out_dim = getattr(param, "output_dim", None)
        if out_dim is None:
            return facts  # not split (per-tensor scales)
        if int(out_dim) != 0:
            raise ExportError(f"{full}: split along dim {out_dim}; apollo-checkpoint maps dim 0 only")
        if "QKVParallelLinear" in classes:
            hs = int(module.head_size)
            vhs = int(getattr(module, "v_head_size", None) or hs)
            heads, kv_heads = int(module.num_heads), int(module.num_kv_heads)
            kv_rank = rank // int(getattr(module, "num_kv_head_replicas", 1))
            blocks = [
                {"rows": int(module.total_num_heads) * hs, "local_rows": heads * hs, "first_row": rank * heads * hs},
                {"rows": int(module.total_num_kv_heads) * hs, "local_rows": kv_heads * hs, "first_row": kv_rank * kv_heads * hs},
                {"rows": int(module.total_num_kv_heads) * vhs, "local_rows": kv_heads * vhs, "first_row": kv_rank * kv_heads * vhs},
            ]
            if short not in packed_mapping:
                # Fused in the checkpoint too (a vision tower's attn.qkv): one HF tensor whose
                # q, k and v row blocks are each sharded, like GDN's conv1d.
                facts.update(shard_dim=sharded, packed=short, names=[short], pieces=blocks)
                return facts
            names = list(packed_mapping[short])
            if len(names) != 3:
                raise ExportError(f"{full}: packed_modules_mapping names {names} for a q/k/v projection")
            facts.update(shard_dim=sharded, packed=short,
                         parts=[dict(b, name=n) for n, b in zip(names, blocks)])
            return facts
        sizes = getattr(module, "output_sizes", None)
        if sizes and short in packed_mapping:
            facts.update(shard_dim=sharded, packed=short, names=list(packed_mapping[short]),
                         pieces=[_piece(s, size, rank) for s in sizes])
        elif sizes and len(sizes) > 1:
            raise ExportError(f"{full}: packs {len(sizes)} blocks but the model's packed_modules_mapping has no entry {short!r}")
        else:
            facts["shard_dim"] = sharded
        return facts
    return facts  # replicated: norms, biases of row-parallel layers, ReplicatedLinear


def _expert_facts(full, module, param_name, facts):
    """A FusedMoE layer's stacked experts: which experts this rank holds (vLLM's `expert_map`,
    global id -> local id or -1, inverted; all of them without expert parallelism) and the
    layer's own tensor-parallel rank and size (1 under expert parallelism)."""
    kinds = {"w13_weight": "w13", "w2_weight": "w2"}
    if param_name not in kinds:
        raise ExportError(f"{full}: a fused-MoE parameter apollo-checkpoint does not map yet (only w13_weight and w2_weight: "
                          "unquantized experts without biases)")
    local = int(getattr(module, "local_num_experts", 0) or param_shape0(module, param_name))
    expert_map = getattr(module, "expert_map", None)
    if expert_map is None:
        experts = list(range(local))
    else:
        values = expert_map.tolist() if hasattr(expert_map, "tolist") else list(expert_map)
        experts = [None] * local
        for global_id, local_id in enumerate(values):
            if 0 <= int(local_id) < local:
                if experts[int(local_id)] is not None:
                    raise ExportError(f"{full}: expert_map places two experts at local slot {local_id} (redundant experts are not mapped)")
                experts[int(local_id)] = global_id
        if any(e is None for e in experts):
            raise ExportError(f"{full}: expert_map leaves local experts without a global id")
    facts.update(tp_rank=int(getattr(module, "tp_rank", 0)), tp_size=int(getattr(module, "tp_size", 1)),
                 shard_dim=None, experts={"kind": kinds[param_name], "experts": experts,
                                          "num_experts": int(getattr(module, "global_num_experts", 0) or len(experts))})
    return facts


def param_shape0(module, param_name):
    return int(dict(module.named_parameters(recurse=False))[param_name].shape[0])


def layout_facts(model, tp_rank=0, tp_size=1):
    """{parameter name: layout facts} for every parameter of `model` (a vLLM model)."""
    mapping = dict(getattr(model, "packed_modules_mapping", None) or {})
    out, seen = {}, set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied weights: the first name only, as named_parameters() does
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            out[name] = param_facts(module_name, module, param_name, param, mapping, tp_rank, tp_size)
    return out


def tied_names(model):
    """{name: first name} for parameters reachable under more than one name (tied embeddings:
    vLLM's lm_head *is* embed_tokens), which named_parameters() lists once."""
    first, tied = {}, {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in first:
                tied[name] = first[id(param)]
            else:
                first[id(param)] = name
    return tied


def mapper_meta(model):
    """The model's hf_to_vllm_mapper (vLLM's WeightsMapper) as plain JSON, or None."""
    m = getattr(model, "hf_to_vllm_mapper", None)
    if m is None:
        return None
    out = {}
    for key in ("orig_to_new_prefix", "orig_to_new_substr", "orig_to_new_suffix"):
        rules = getattr(m, key, None) or {}
        out[key] = {str(k): (None if v is None else str(v)) for k, v in dict(rules).items()}
    return out


CONFIG_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim")


def config_meta(hf_config, hf_text_config=None):
    """The model-config keys apollo-checkpoint checks against the files' config.json."""
    text = hf_text_config or hf_config
    out = {}
    for key in CONFIG_KEYS:
        value = getattr(hf_config if key == "architectures" else text, key, None)
        if isinstance(value, (int, str)) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            out[key] = value
    return out


def _ranks():
    """(tp rank, tp size, pp rank, pp size) of this worker; one rank outside vLLM."""
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        pp = get_pp_group()
        return (int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size()),
                int(pp.rank_in_group), int(pp.world_size))
    except Exception:  # noqa: BLE001 - outside vLLM: one rank
        return 0, 1, 0, 1


def _shared_export_id():
    """One id for every worker of this export: rank 0's, broadcast over vLLM's world group (every
    worker runs the hook at once under collective_rpc); a fresh one for a single process."""
    fresh = uuid.uuid4().hex
    try:
        from vllm.distributed import get_world_group
        group = get_world_group()
        if int(group.world_size) > 1:
            return str(group.broadcast_object(fresh, src=0))
    except Exception:  # noqa: BLE001 - outside vLLM
        pass
    return fresh


def manifest_name(pp_rank, tp_rank):
    return f"handles-pp{pp_rank}-tp{tp_rank}.json"


def export_model(model, out_dir, ranks=(0, 1, 0, 1), export_id=None, model_config=None, entry=manifest_entry):
    """Writes this worker's manifest of `model` (a vLLM model) into `out_dir`; returns its path.

    `ranks` is (tp rank, tp size, pp rank, pp size); `export_id` must be the same on every worker of
    one export; `entry` makes one manifest entry (tests pass one that needs no GPU)."""
    check_allocator()
    if model_config is not None and getattr(model_config, "enable_sleep_mode", False):
        raise ExportError(f"vLLM runs with sleep mode: {NOT_SHAREABLE}")
    tp_rank, tp_size, pp_rank, pp_size = ranks
    meta = {
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "pp_rank": pp_rank,
        "pp_size": pp_size,
        "export_id": export_id or uuid.uuid4().hex,
        "packed_modules_mapping": {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()},
        "tied": tied_names(model),
    }
    mapper = mapper_meta(model)
    if mapper:
        meta["hf_to_vllm_mapper"] = mapper
    if model_config is not None:
        meta["served_model"] = str(getattr(model_config, "model", ""))
        meta["config"] = config_meta(model_config.hf_config, getattr(model_config, "hf_text_config", None))
    facts = layout_facts(model, tp_rank, tp_size)
    path = os.path.join(out_dir, manifest_name(pp_rank, tp_rank))
    write_entries(path, [entry(n, t, facts.get(n)) for n, t in model.named_parameters()], meta)
    return path


class ApolloExportExtension:
    """vLLM worker extension (`--worker-extension-cls vllm_export_hook.ApolloExportExtension`).

    `llm.collective_rpc("apollo_export_handles", args=(out_dir,))` (or `POST /collective_rpc` on a
    server started with VLLM_SERVER_DEV_MODE=1) writes `out_dir/handles-pp{P}-tp{T}.json` on every
    worker, all with one export id.
    """

    def apollo_export_handles(self, out_dir, export_id=None):
        model = self.model_runner.model  # vLLM's GPU worker holds the model here
        model_config = getattr(self.model_runner, "model_config", None)
        return export_model(model, out_dir, _ranks(), export_id or _shared_export_id(), model_config)
