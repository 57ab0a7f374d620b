"""What the GPU scripts share: finding PyTorch with enough CUDA GPUs (or skipping with exit code
77, saying why) and a list of named checks printed as a pass/fail summary."""

SKIP = 77


def cuda_torch(gpus=1):
    """PyTorch if it sees at least `gpus` CUDA GPUs; otherwise prints why the script skips and
    returns None."""
    try:
        import torch
    except ImportError:
        print("SKIP: PyTorch is not installed")
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        print("SKIP: no CUDA GPU")
        return None
    if count < gpus:
        print(f"SKIP: {count} GPU(s), this test needs {gpus}")
        return None
    return torch


class Checks:
    """Named pass/fail results."""

    def __init__(self):
        self.results = []

    def ok(self, name, cond, detail=""):
        self.results.append((name, bool(cond), str(detail)))

    def report(self):
        """Prints every result and the counts; returns the exit code (1 if any failed)."""
        for name, passed, detail in self.results:
            print(f"{'PASS' if passed else 'FAIL'}: {name}" + (f" ({detail.strip()})" if detail and not passed else ""))
        failed = sum(1 for _, p, _ in self.results if not p)
        print(f"{len(self.results) - failed} passed, {failed} failed")
        return 1 if failed else 0
