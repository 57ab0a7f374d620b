"""Export CUDA IPC handles of live weights as a JSON manifest, for `apollo-checkpoint`.

Runs inside the process that owns the weights (each vLLM worker). It never pickles anything: the
manifest is plain JSON, one per rank, written atomically (temporary file, fsync, rename), with for
every parameter its name, dtype, shape and strides, the GPU's UUID, the 64-byte CUDA IPC memory
handle of the allocation holding it (hex), the byte offset of the tensor inside that allocation,
and the owning pid. Several parameters usually share one allocation (one handle, other offsets).

The core, `manifest_entry`, works on plain PyTorch tensors. `write_manifest` writes a manifest
for any iterable of (name, tensor). The vLLM integration (`ApolloExportExtension`, a worker
extension class for `--worker-extension-cls`, called through `collective_rpc`) is a thin layer on
top; it has not yet been exercised against a real vLLM server.

PyTorch's expandable-segments allocator cannot share memory through cudaIpc handles; the hook
refuses it with a clear message (set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False).
"""

import json
import os
import tempfile

MANIFEST_VERSION = 1

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
    _rebuild, args = reduce_tensor(tensor.detach())
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
    doc = {"format": "apollo-checkpoint-handles", "version": MANIFEST_VERSION, "meta": meta or {}, "tensors": entries}
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


class ApolloExportExtension:
    """vLLM worker extension (`--worker-extension-cls scripts.vllm_export_hook.ApolloExportExtension`).

    `llm.collective_rpc("apollo_export_handles", args=(out_dir,))` writes
    `out_dir/handles-rank{R}.json` on every worker.
    """

    def apollo_export_handles(self, out_dir):
        model = self.model_runner.model  # vLLM's GPU worker holds the model here
        rank = getattr(self, "rank", 0)
        meta = {"rank": rank}
        path = os.path.join(out_dir, f"handles-rank{rank}.json")
        return write_manifest(path, model.named_parameters(), meta=meta)
