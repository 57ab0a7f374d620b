#!/usr/bin/env python3
"""GPU test of the export hook's core (run on a machine with a CUDA GPU and PyTorch).

The producer puts tensors on the GPU — bf16 and f32, separate allocations and views into one
shared allocation, as vLLM's packed parameters are — and writes a manifest with the hook. A second
process opens every 64-byte IPC handle with the CUDA driver API (ctypes, no PyTorch), copies each
tensor's bytes at its manifest offset, and the producer checks they equal the tensors' bytes. It
also checks that a non-contiguous tensor and expandable segments are refused.
Prints a pass/fail summary; exits non-zero on failure. Skips (exit 77, saying so) without PyTorch or a GPU.
"""

import ctypes
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_checks  # noqa: E402


def reader(manifest_path, out_path):
    """Second process: open each handle with the driver API and dump the tensors' bytes."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    class Handle(ctypes.Structure):
        _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # c_char would stop at a zero byte

    check(cuda.cuInit(0), "cuInit")
    doc = json.load(open(manifest_path))
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), doc["tensors"][0]["device"]), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    cuda.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), Handle, ctypes.c_uint]
    opened = {}
    out = {}
    for t in doc["tensors"]:
        h = t["ipc_handle"]
        if h not in opened:  # several tensors share an allocation: open each handle once
            ptr = ctypes.c_uint64()
            handle = Handle((ctypes.c_ubyte * 64).from_buffer_copy(bytes.fromhex(h)))
            check(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), handle, 1), "cuIpcOpenMemHandle")
            opened[h] = ptr.value
        buf = ctypes.create_string_buffer(t["nbytes"])
        check(cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(opened[h] + t["offset"]), ctypes.c_size_t(t["nbytes"])), "cuMemcpyDtoH")
        out[t["name"]] = buf.raw.hex()
    for ptr in opened.values():
        check(cuda.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")
    json.dump({"tensors": out, "handles": len(opened)}, open(out_path, "w"))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--reader":
        reader(sys.argv[2], sys.argv[3])
        return 0
    torch = gpu_checks.cuda_torch()
    if torch is None:
        return gpu_checks.SKIP
    import vllm_export_hook as hook

    checks = gpu_checks.Checks()
    ok = checks.ok

    torch.manual_seed(0)
    packed = torch.randn(48 + 16 + 16, 64, device="cuda", dtype=torch.bfloat16)  # a qkv_proj
    tensors = [
        ("qkv_proj.weight", packed),
        ("q_view", packed[:48]),  # views share the allocation, at other offsets
        ("k_view", packed[48:64]),
        ("A_log", torch.randn(48, device="cuda", dtype=torch.float32)),
        ("embed", torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "handles-rank0.json")
        n = hook.write_manifest(manifest, tensors, meta={"rank": 0})
        doc = json.load(open(manifest))
        ok("manifest written atomically, no temporaries left", n == 5 and os.listdir(tmp) == ["handles-rank0.json"])
        entries = {e["name"]: e for e in doc["tensors"]}
        ok("handles are 64 bytes", all(len(bytes.fromhex(e["ipc_handle"])) == 64 for e in entries.values()))
        ok("views share their allocation's handle", entries["q_view"]["ipc_handle"] == entries["qkv_proj.weight"]["ipc_handle"])
        ok("view offsets", entries["k_view"]["offset"] - entries["qkv_proj.weight"]["offset"] == 48 * 64 * 2,
           f'{entries["k_view"]["offset"]} vs {entries["qkv_proj.weight"]["offset"]}')
        ok("pid and device uuid", entries["A_log"]["pid"] == os.getpid() and entries["A_log"]["device_uuid"])
        dumped = os.path.join(tmp, "dump.json")
        r = subprocess.run([sys.executable, __file__, "--reader", manifest, dumped], capture_output=True, text=True)
        ok("second process opens the handles", r.returncode == 0, r.stderr[-2000:])
        if r.returncode == 0:
            got = json.load(open(dumped))
            for name, t in tensors:
                want = t.contiguous().view(torch.uint8).cpu().numpy().tobytes().hex()
                ok(f"bytes of {name} read through its handle", got["tensors"][name] == want)
            ok("each allocation opened once", got["handles"] < len(tensors), str(got["handles"]))
        try:
            hook.manifest_entry("t", packed.t())
            ok("non-contiguous tensors are refused", False)
        except hook.ExportError as e:
            ok("non-contiguous tensors are refused", "not contiguous" in str(e))
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        try:
            hook.write_manifest(os.path.join(tmp, "x.json"), tensors)
            ok("expandable segments are refused", False)
        except hook.ExportError as e:
            ok("expandable segments are refused", "expandable_segments:False" in str(e))
        del os.environ["PYTORCH_CUDA_ALLOC_CONF"]

    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
