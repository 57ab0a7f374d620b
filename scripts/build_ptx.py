#!/usr/bin/env python3
"""Compiles src/live/blake3.cu with NVRTC (no CUDA toolkit, no GPU) to src/live/blake3.ptx, and
to ready machine code for the GPU generations vLLM hosts run (src/live/blake3.sm80.cubin for
A100-class and newer sm_8x, src/live/blake3.sm90.cubin for H100/H200).

Both are committed and embedded in the binary: a GPU with matching machine code loads it
directly; any other takes the PTX, which the NVIDIA driver JIT-compiles at run time. Run this after changing blake3.cu. It uses NVRTC from the
`nvidia-cuda-nvrtc-cu12` wheel (downloaded from PyPI into target/nvrtc if NVRTC_LIB does not
name a libnvrtc.so): NVRTC 12.1 emits PTX ISA 8.1, which drivers for CUDA 12.1 and newer load.
The PTX records the BLAKE3 of the source it came from (checked by tests/integration/gpu_kernel.rs).

Usage: scripts/build_ptx.py
"""

import ctypes
import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src/live/blake3.cu"
OUT = ROOT / "src/live/blake3.ptx"
WHEEL = "nvidia-cuda-nvrtc-cu12==12.1.105"
ARCH = "compute_70"
CUBINS = {"sm_80": ROOT / "src/live/blake3.sm80.cubin", "sm_90": ROOT / "src/live/blake3.sm90.cubin"}


def nvrtc_lib():
    if os.environ.get("NVRTC_LIB"):
        return os.environ["NVRTC_LIB"]
    cache = ROOT / "target/nvrtc"
    found = glob.glob(str(cache / "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "--python-version", "3.11", WHEEL, "-d", str(cache)],
                       check=True)
        for whl in cache.glob("*.whl"):
            zipfile.ZipFile(whl).extractall(cache)
        found = glob.glob(str(cache / "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"))
    return sorted(f for f in found if "builtins" not in f)[0]


def source_hash(text):
    """BLAKE3 of the source, from the blake3 package (installed with pip if missing)."""
    try:
        import blake3
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "blake3"], check=True)
        import blake3
    return blake3.blake3(text).hexdigest()


def compile_for(lib, src, arch):
    """The program compiled for `arch` (compute_XX: PTX; sm_XX: machine code)."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"blake3.cu", 0, None, None)
    if rc:
        sys.exit(f"nvrtcCreateProgram: {rc}")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++14", b"--use_fast_math"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"nvrtcCompileProgram {arch} failed ({rc}):\n{log.value.decode()}")
    kind = "CUBIN" if arch.startswith("sm_") else "PTX"
    getsize, get = getattr(lib, f"nvrtcGet{kind}Size"), getattr(lib, f"nvrtcGet{kind}")
    getsize(prog, ctypes.byref(size))
    out = ctypes.create_string_buffer(size.value)
    get(prog, out)
    return out.raw[:size.value]


def main():
    lib = ctypes.CDLL(nvrtc_lib())
    src = SRC.read_bytes()
    ptx = ctypes.create_string_buffer(compile_for(lib, src, ARCH))
    for arch, path in CUBINS.items():
        path.write_bytes(compile_for(lib, src, arch))
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    header = (f"// Generated from src/live/blake3.cu by scripts/build_ptx.py (NVRTC {major.value}.{minor.value}, "
              f"{ARCH}); do not edit.\n// source blake3: {source_hash(src)}\n")
    OUT.write_text(header + ptx.value.decode())
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
