#!/usr/bin/env python3
"""Convert the prototype's torch.save handles file (/tmp/vllm_weight_handles.pt) to a manifest.

The prototype wrote `{name: {"handle": (rebuild_cuda_tensor, args)}, "__metadata__": ...}` with
torch.save and read it back with torch.load(weights_only=False), which runs whatever code the file
names. This converter never does that: it reads the pickle inside the torch.save archive with a
restricted unpickler that accepts only the structure the prototype wrote (torch's CUDA tensor
rebuild function, tensor, storage and Size classes, dtypes, plain containers) and refuses
anything else, then writes the JSON manifest `apollo-checkpoint sync --handles` reads.

Run it on the GPU host (it needs PyTorch to learn the GPU's UUID), installed with the package
(`pip install ./scripts`) or from the source tree:
    apollo-convert-legacy-handles /tmp/vllm_weight_handles.pt /run/apollo/handles-rank0.json
    scripts/convert_legacy_handles.py /tmp/vllm_weight_handles.pt /run/apollo/handles-rank0.json
The old file does not record the producer's pid, so a stale handle is only noticed when
apollo-checkpoint tries to open it.
"""

import io
import os
import pickle
import sys
import zipfile

_DTYPES = {"bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32",
           "float64": "F64", "int8": "I8", "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64",
           "bool": "BOOL"}


class _Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


class _Size(tuple):
    pass


def _size(*args):
    return _Size(args[0] if args else ())


def _latin1(text, encoding="latin1"):
    """Pickle protocol 2 stores bytes as _codecs.encode(text, 'latin1'): rebuild only that."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode with anything but latin1 text")
    return text.encode("latin1")


_ALLOWED = {
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _Marker("rebuild_cuda_tensor"),
    ("torch", "Tensor"): _Marker("Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
    ("torch", "UntypedStorage"): _Marker("UntypedStorage"),
    ("torch.storage", "UntypedStorage"): _Marker("UntypedStorage"),
    ("torch.storage", "TypedStorage"): _Marker("TypedStorage"),
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): dict,
    ("_codecs", "encode"): _latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only the prototype's structure; any other global is refused, nothing is executed."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _Marker("dtype:" + _DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a handles file")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing tensor data: a handles file holds no tensors")


def load(path):
    """The prototype's dict, read without executing anything."""
    with open(path, "rb") as f:
        raw = f.read()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise ValueError(f"{path}: not a torch.save archive with one data.pkl")
            raw = z.read(names[0])
    return RestrictedUnpickler(io.BytesIO(raw)).load()


def convert(path, out):
    handles = load(path)
    if not isinstance(handles, dict):
        raise ValueError(f"{path}: not a dict of handles")
    # Only a readable file needs PyTorch (for the GPU's UUID): on the GPU host.
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path}: converting needs PyTorch, to read the GPU's UUID; run this on the GPU host ({e})") from e
    import vllm_export_hook as hook

    entries = []
    for name, info in handles.items():
        if name == "__metadata__":
            continue
        func, args = info["handle"]
        if getattr(func, "name", None) != "rebuild_cuda_tensor":
            raise ValueError(f"{name}: not a CUDA tensor handle")
        size, stride, tensor_offset, dtype, device = args[1], args[2], args[3], args[5], args[6]
        handle, storage_size, storage_offset = args[7], args[8], args[9]
        dtype = getattr(dtype, "name", "").removeprefix("dtype:")
        if dtype not in _DTYPES.values():
            raise ValueError(f"{name}: unsupported dtype")
        elem = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}[dtype]
        numel = 1
        for d in size:
            numel *= int(d)
        entries.append({
            "name": name, "dtype": dtype, "shape": [int(d) for d in size], "strides": [int(s) for s in stride],
            "nbytes": numel * elem, "device": int(device),
            "device_uuid": str(torch.cuda.get_device_properties(int(device)).uuid),
            "ipc_handle": hook._ipc_handle(bytes(handle), name).hex(),
            "offset": int(storage_offset) + int(tensor_offset) * elem,
            "allocation_bytes": int(storage_offset) + int(storage_size), "pid": None,
        })
    hook.write_entries(out, entries, meta={"converted_from": os.path.abspath(path)})
    return len(entries)


def main(argv=None):
    """The command line: OLD.pt NEW.json; exit 2 on a bad command line, 1 on a refused file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    try:
        n = convert(args[0], args[1])
    except (pickle.UnpicklingError, ValueError, KeyError) as e:
        print(f"convert_legacy_handles: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} tensors to {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
