"""What a stage cost: wall-clock seconds per named stage and peak resident memory."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager


_OPEN_WINDOWS: list[list[float]] = []   # the running peaks (MB) of the open peak_window()s, outermost first


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: VmHWM is reset through /proc/self/clear_refs). The peak
    reached so far is first folded into every open :func:`peak_window`, so an inner reset never hides
    an outer window's peak."""
    if _OPEN_WINDOWS:
        now = _vmhwm_mb()
        for w in _OPEN_WINDOWS:
            w[0] = max(w[0], now)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _vmhwm_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return process_peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last reset_peak_rss() (Linux), else of the process."""
    return _vmhwm_mb()


@contextmanager
def peak_window():
    """Measure the peak RSS (MB) of a block, exact even when code inside calls reset_peak_rss():
    ``with peak_window() as box: ...`` then ``box["peak_mb"]``."""
    box = {"peak_mb": float("nan")}
    reset_peak_rss()
    w = [0.0]
    _OPEN_WINDOWS.append(w)
    try:
        yield box
    finally:
        _OPEN_WINDOWS.remove(w)
        box["peak_mb"] = max(w[0], _vmhwm_mb())


def process_peak_rss_mb() -> float:
    """Peak resident memory (MB) of the whole process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageTimer:
    """Wall-clock seconds per named stage (a stage entered twice accumulates): ``with t.time("x"):``.
    Also the peak resident memory of each stage (``peak_rss_mb``; Linux: the VmHWM window is reset on
    entry, elsewhere the process's peak so far) and, when CUDA is in use, the peak GPU memory allocated
    by PyTorch (``peak_gpu_mb``). The RSS peak is exact even if code inside resets the peak window
    (:func:`peak_window`); the CUDA peak is reset on entry, so CUDA stages must not be nested."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    @contextmanager
    def time(self, name: str):
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with peak_window() as box:
            try:
                yield
            finally:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), box["peak_mb"])
        if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            gpu = torch.cuda.max_memory_allocated() / 2**20
            self.peak_gpu_mb[name] = max(self.peak_gpu_mb.get(name, 0.0), gpu)


def model_flops(model, x) -> dict:
    """FLOPs of one input through ``model``, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matrix multiplications and convolutions — the ops that dominate a CNN; elementwise ops, BatchNorm
    and pooling are not counted). x: one input batch [1, ...]. Returns {forward, backward_one_logit
    (the backward pass of one logit, parameters and activations), per_logit_gradient = forward +
    backward_one_logit}, per input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        x = x[:1]
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as both:
            out = model(x)
            torch.autograd.grad(out[:, 0].sum(), params, allow_unused=True)
        f = float(fwd.get_total_flops())
        b = float(both.get_total_flops()) - f
    finally:
        model.train(was)
    return {"forward": f, "backward_one_logit": b, "per_logit_gradient": f + b}


def folder_bytes(*paths) -> int:
    """Bytes of the files under the given files or folders (missing paths count 0)."""
    from pathlib import Path

    total = 0
    for p in paths:
        p = Path(p)
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def exact_entk_cost(n_train: int, n_test: int, C: int, P: int, *, flops_per_input: float,
                    seconds_per_gradient: float, contraction_flops_per_second: float, itemsize: int = 4) -> dict:
    """The uncompressed exact per-class eNTK of n_train × (n_train + n_test) inputs at P parameters,
    extrapolated from measured unit costs:

        per-logit Jacobians  J = (n_train + n_test)·C, each P numbers (J·P·itemsize bytes to hold them)
        gradient FLOPs       (n_train + n_test) · flops_per_input   (one forward + C backward passes per input)
        contraction FLOPs    2·P·C·(n_train² + n_train·n_test)   (K_train [C, n, n] and K_test [C, n_test, n])
        time                 J · seconds_per_gradient + contraction FLOPs / contraction_flops_per_second
        kernel bytes         8·C·(n_train² + n_test·n_train)  (float64; the storage floor of a method that
                             recomputes gradients instead of holding them, e.g. sliced_class_kernels)
    """
    J = (n_train + n_test) * C
    contraction = 2.0 * P * C * (n_train ** 2 + n_train * n_test)
    grad = (n_train + n_test) * flops_per_input
    return {"n_train": n_train, "n_test": n_test, "classes": C, "parameters": P, "per_logit_jacobians": J,
            "jacobian_bytes": J * P * itemsize, "gradient_flops": grad,
            "contraction_flops": contraction, "flops": grad + contraction,
            "seconds": J * seconds_per_gradient + contraction / contraction_flops_per_second,
            "kernel_bytes": 8 * C * (n_train ** 2 + n_test * n_train)}


def contraction_rate(C: int, n: int, *, width: int = 1 << 14, device="cpu", reps: int = 2) -> float:
    """Measured FLOP/s of the exact eNTK's contraction at n inputs: the batched Gram product of a
    [C, n, width] float32 block (as :func:`dntk.features.sliced_class_kernels` forms it), after one warm-up."""
    import torch

    block = torch.randn(C, n, width, device=device)

    def once():
        torch.bmm(block, block.transpose(1, 2))
        if "cuda" in str(device):
            torch.cuda.synchronize()

    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return 2.0 * C * n * n * width * reps / (time.perf_counter() - t)


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run on, before any work: an unknown name (``foo``), CUDA without
    a CUDA GPU, a CUDA index past the GPUs present, MPS where it is unavailable."""
    import torch

    from .errors import DNTKError

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DNTKError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:1, ...") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DNTKError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DNTKError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DNTKError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif d.type != "cpu":
        raise DNTKError(f"--device {device}: dntk runs on cpu, cuda or mps, not {d.type}")


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (torch.set_num_threads) when given; returns the intra-op thread count in force."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def environment(device) -> dict:
    """What a result's numbers depend on beyond the config (recorded in results.json): CPU threads
    (intra- and inter-op), the device and its name, the versions of dntk, torch (and its CUDA), numpy and
    Python, and the platform. Teacher training is not bit-identical across thread counts (docs/reproducibility.md
    says what is)."""
    import platform

    import numpy
    import torch

    from . import __version__

    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "device": str(device), "device_name": name, "dntk": __version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
