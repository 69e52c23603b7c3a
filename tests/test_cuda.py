"""The GPU paths against the CPU: exact eNTK (empirical_ntk and the sliced per-class kernels reproduce
uses), per-class KRR solves, a WMDD step, and an NCCL process group under torchrun. Marked ``cuda``:
``pytest -m cuda`` runs them (stage (a) of benchmarks/gpu_suite.py); skipped without a CUDA device.
``DNTK_CUDA_TEST_DEVICE=cpu`` runs them with the CPU as the second device (gloo for the process group),
which checks the tests themselves on a machine without a GPU."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import dntk
from dntk.kernels import PerClassKRR
from dntk.models.networks import SmallCNN

DEV = os.environ.get("DNTK_CUDA_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def _cnn(dtype=torch.float64, n=6, size=12, classes=4):
    torch.manual_seed(0)
    model = SmallCNN(3, classes).to(dtype)
    with torch.no_grad():   # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval(), torch.randn(n, 3, size, size, dtype=dtype)


def test_exact_entk_on_the_gpu_matches_the_cpu():
    model, x = _cnn()
    K = dntk.empirical_ntk(model, x, blocks="per_class")
    K_dev = dntk.empirical_ntk(copy.deepcopy(model).to(DEV), x.to(DEV), blocks="per_class")
    assert K.shape == K_dev.shape == (4, 6, 6) and K.dtype == K_dev.dtype == torch.float64
    assert rel(K_dev, K) < 1e-10                      # float64 model: no TF32, only summation order differs
    full = dntk.empirical_ntk(copy.deepcopy(model).to(DEV), x.to(DEV), x[:3].to(DEV), blocks="full")
    assert rel(full, dntk.empirical_ntk(model, x, x[:3], blocks="full")) < 1e-10
    m32, x32 = _cnn(torch.float32)                   # float32: cuDNN may use TF32 convolutions (10-bit mantissa)
    K32 = dntk.empirical_ntk(copy.deepcopy(m32).to(DEV), x32.to(DEV))
    assert rel(K32, dntk.empirical_ntk(m32, x32)) < 5e-3


def test_sliced_class_kernels_on_the_gpu_match_the_cpu():
    from dntk.features import sliced_class_kernels

    model, x = _cnn()
    P = sum(p.numel() for p in model.parameters())
    budget = 4 * 4 * len(x) * P // 3 * 2     # about 3 parameter slices (the float64 gradients: 8 bytes)
    K, info = sliced_class_kernels(model, x, memory_budget_bytes=budget)
    K_dev, info_dev = sliced_class_kernels(copy.deepcopy(model).to(DEV), x.to(DEV), memory_budget_bytes=budget)
    assert info["groups"] == info_dev["groups"] >= 2
    assert rel(K_dev, K) < 1e-10
    assert rel(K, dntk.empirical_ntk(model, x)) < 1e-10


def test_krr_on_the_gpu_matches_the_cpu():
    g = torch.Generator().manual_seed(1)
    F, Ft = torch.randn(3, 40, 16, generator=g), torch.randn(3, 25, 16, generator=g)
    Y = torch.randn(40, 3, generator=g)
    for form in ("dual", "primal"):
        a = PerClassKRR(ridge=1e-3, form=form).fit(F, Y).predict(Ft)
        b = PerClassKRR(ridge=1e-3, form=form, device=DEV).fit(F, Y).predict(Ft)
        assert b.device.type == "cpu" and b.shape == (25, 3)
        assert rel(b, a) < 1e-10
    K, Kt = F @ F.transpose(1, 2), Ft @ F.transpose(1, 2)
    a = PerClassKRR(ridge=1e-3).fit_kernel(K, Y).predict_kernel(Kt)
    b = PerClassKRR(ridge=1e-3, device=DEV).fit_kernel(K, Y).predict_kernel(Kt)
    assert rel(b, a) < 1e-10


def test_a_wmdd_group_on_the_gpu_matches_the_cpu():
    from dntk.distill.wmdd import WMDDConfig, bn_layers, class_targets, optimise_group

    model, _ = _cnn(classes=2)
    g = torch.Generator().manual_seed(2)
    real = [torch.randn(8, 3, 12, 12, generator=g, dtype=torch.float64) + c for c in range(2)]
    cfg = WMDDConfig(ipc=2, iterations=3, seed=0, classes_per_step=2)
    layers = bn_layers(model)
    ts = [class_targets(model, real[c], c, cfg, layers) for c in range(2)]
    init = torch.cat([real[c][t["init_indices"]] for c, t in enumerate(ts)])
    sup = torch.stack([t["support"] for t in ts])
    stats = [t["stats"] for t in ts]
    x, rec = optimise_group(model, init, [0, 1], sup, stats, cfg, layers)
    dev_model = copy.deepcopy(model).to(DEV)
    x_dev, rec_dev = optimise_group(dev_model, init, [0, 1], sup, stats, cfg, bn_layers(dev_model), device=DEV)
    assert x_dev.device.type == "cpu" and not torch.equal(x, init)   # it moved the images
    assert rel(x_dev, x) < 1e-6     # float64; Adam's first steps are ≈ lr·sign(g), so allow for rounding near g = 0
    for a, b in zip(rec, rec_dev):
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)


def test_a_process_group_under_torchrun(tmp_path):
    """torchrun with one process and the GPU's backend (NCCL): init, all_reduce, barrier — what a
    multi-GPU `torchrun -m dntk run --device cuda` needs of the machine. (dntk itself only forms a process
    group for WORLD_SIZE > 1, and NCCL refuses two ranks on one GPU, so dntk's own ranks are not run here.)"""
    backend = "nccl" if DEV.startswith("cuda") else "gloo"
    script = tmp_path / "pg.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "backend = sys.argv[1]\n"
        "dist.init_process_group(backend)\n"
        "dev = 'cuda' if backend == 'nccl' else 'cpu'\n"
        "if dev == 'cuda': torch.cuda.set_device(0)\n"
        "t = torch.ones(3, device=dev) * (dist.get_rank() + 2)\n"
        "dist.all_reduce(t)\n"
        "dist.barrier()\n"
        "print('RESULT', json.dumps({'world': dist.get_world_size(), 'backend': dist.get_backend(), 'sum': t.tolist()}))\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        str(script), backend], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert json.loads(line[7:]) == {"world": 1, "backend": backend, "sum": [2.0, 2.0, 2.0]}
