"""Concrete projectors. See :mod:`dntk.projection` for the cost/accuracy table.

What is bit-identical where (torch 2.14):

- **The map S** is a function of (seed, parameter names and shapes) only: hash tables, signs and
  dense chunks are generated on the CPU and copied to the block's device, so every device, batch
  size, batch order and process uses exactly the same S (for the same torch version).
- **CPU**: the bucket sums (``index_add_``) run sequentially and the FFTs are deterministic, so the
  projection of the same gradients is bitwise identical run to run, across batch sizes, batch
  orders and processes. For a float64 model the features are bitwise identical across all of
  these (tested). For float32 models the *network's* gradients themselves differ at ~1e-6
  relative across batch sizes (oneDNN picks batch-size-dependent convolution algorithms).
- **CUDA, default settings**: ``index_add_`` (sjlt, tensorsketch's count sketches and its
  materialised path) accumulates with atomic adds, whose order varies from run to run, and
  cuBLAS/cuDNN pick shape-dependent algorithms; features agree with the CPU's and between runs to
  float rounding (CPU vs CUDA: ≤ 1e-5 relative, tested on a GPU), not bitwise.
- **CUDA with** ``torch.use_deterministic_algorithms(True)`` (and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
  in the environment, which PyTorch then requires for cuBLAS): torch 2.14 documents
  ``torch.index_add`` on CUDA among the operations that then run deterministically — it
  dispatches to the sort-based ``index_put_(..., accumulate=True)`` kernel instead of atomics — and
  cuDNN uses deterministic convolutions, so repeated runs with the same GPU model, software and
  batch size give bitwise-identical features. They are still not bitwise equal to the CPU's, nor
  across batch sizes. (From PyTorch's documentation and source; not measured by this project.)
"""

from __future__ import annotations

import math

import torch

from ..errors import DNTKError
from .base import BlockSpec, Projector, _check_out, chunk_rows, cpu_generator, random_signs


_HALF = (torch.float16, torch.bfloat16)


class _DeviceCache:
    """Per-device copies of CPU-generated tensors (generated once, on the CPU, from the seed)."""

    def __init__(self):
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, device: torch.device, make) -> torch.Tensor:
        dev_key = key + (str(device),)
        t = self._store.get(dev_key)
        if t is None:
            cpu_key = key + ("cpu",)
            t = self._store.get(cpu_key)
            if t is None:
                t = make()
                self._store[cpu_key] = t
            if str(device) != "cpu":
                t = t.to(device)
                self._store[dev_key] = t
        return t


class IdentityProjector(Projector):
    """Exact features: S = I, k = P. Blocks are laid out in the order they were bound."""

    name = "identity"

    def __init__(self, k: int | None = None, seed: int = 0):
        super().__init__(None, seed)
        self._offsets: dict[str, int] = {}

    def bind(self, specs):
        super().bind(specs)
        self._offsets, off = {}, 0
        for s in specs:
            self._offsets[s.name] = off
            off += s.numel
        self.k = off
        return self

    def project(self, key, block, out):
        _check_out(out, self.dim)
        off = self._offsets[self._spec(key).name]
        out[:, off : off + block.shape[1]] += block.to(out.dtype)


class DenseProjector(Projector):
    """Dense i.i.d. sketch (Gaussian N(0,1)/√k or Rademacher ±1/√k), generated chunk by chunk of
    rows from the seed and never stored whole. Cost O(P·k) per gradient plus generating P·k random
    numbers per batch — the expensive classic. Chunks are kept in memory when the whole map fits
    in ``cache_bytes`` (small models)."""

    def __init__(self, k: int, seed: int = 0, *, distribution: str = "gaussian", cache_bytes: int = 256 << 20):
        super().__init__(k, seed)
        if distribution not in ("gaussian", "rademacher"):
            raise DNTKError(f"unknown dense distribution {distribution!r}; use 'gaussian' or 'rademacher'")
        self.distribution = distribution
        self.name = distribution
        self.cache_bytes = cache_bytes
        self._cache = _DeviceCache()
        self._cache_all = False

    def bind(self, specs):
        super().bind(specs)
        self._cache_all = self.num_params * self.k * 4 <= self.cache_bytes
        return self

    def _chunk(self, key: str, index: int, rows: int) -> torch.Tensor:
        gen = cpu_generator(self.seed, key, f"{self.distribution}:{index}")
        if self.distribution == "gaussian":
            m = torch.randn(rows, self.k, generator=gen)
        else:
            m = torch.randint(0, 2, (rows, self.k), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
        return m.mul_(1.0 / math.sqrt(self.k))

    def project(self, key, block, out):
        _check_out(out, self.k)
        spec = self._spec(key)
        step = chunk_rows(self.k)
        for index, start in enumerate(range(0, spec.numel, step)):
            rows = min(step, spec.numel - start)
            if self._cache_all:
                q = self._cache.get((key, index), out.device, lambda: self._chunk(key, index, rows))
            else:
                q = self._chunk(key, index, rows).to(out.device)
            out += (block[:, start : start + rows] @ q.to(block.dtype)).to(out.dtype)


class SJLTProjector(Projector):
    """Sparse Johnson–Lindenstrauss transform: each coordinate goes to ``s`` hashed buckets with
    hashed signs, scaled 1/√s (s = 1 is CountSketch). Buckets are fully random per coordinate.

    For outer-product blocks the sign of entry (i, j) is the product s_row(i)·s_col(j); the signs
    then fold into the small factors g and a before the per-sample product, so the sign flip costs
    nothing. Products of independent ±1 are still pairwise independent, which is what the
    estimator's unbiasedness needs; the bucket hash stays fully random. Either evaluation path
    (materialised block or factors) uses the same signs, so S is one fixed matrix.

    Buckets are summed with ``index_add_``: bitwise reproducible on the CPU; on CUDA atomic (run-to-run
    differences at float rounding) unless ``torch.use_deterministic_algorithms(True)`` — see the
    module docstring for exactly what is bit-identical where.
    """

    name = "sjlt"

    def __init__(self, k: int, seed: int = 0, *, s: int = 1):
        super().__init__(k, seed)
        if not isinstance(s, int) or s < 1:
            raise DNTKError(f"SJLT sparsity s must be a positive integer, got {s!r}")
        self.s = s
        self._cache = _DeviceCache()

    def _index(self, key, r, device):
        spec = self._spec(key)
        return self._cache.get(
            (key, "idx", r), device,
            lambda: torch.randint(0, self.k, (spec.numel,), generator=cpu_generator(self.seed, key, f"sjlt-idx:{r}")),
        )

    def _signs(self, key, r, device):
        """(row_signs, col_signs) for factored blocks, or (full_signs, None)."""
        spec = self._spec(key)
        if spec.factors is not None:
            rows, cols = spec.factors
            sr = self._cache.get((key, "sr", r), device, lambda: random_signs(rows, cpu_generator(self.seed, key, f"sjlt-sr:{r}")))
            sc = self._cache.get((key, "sc", r), device, lambda: random_signs(cols, cpu_generator(self.seed, key, f"sjlt-sc:{r}")))
            return sr, sc
        return self._cache.get((key, "sg", r), device, lambda: random_signs(spec.numel, cpu_generator(self.seed, key, f"sjlt-sg:{r}"))), None

    def _full_signs(self, key, r, device):
        sr, sc = self._signs(key, r, device)
        if sc is None:
            return sr
        return self._cache.get((key, "sfull", r), device, lambda: torch.outer(sr.cpu(), sc.cpu()).reshape(-1))

    def project(self, key, block, out):
        _check_out(out, self.k)
        scale = 1.0 / math.sqrt(self.s)
        for r in range(self.s):
            signed = block * self._full_signs(key, r, block.device).to(block.dtype)
            if scale != 1.0:
                signed.mul_(scale)
            out.index_add_(1, self._index(key, r, block.device), signed.to(out.dtype))

    def project_outer(self, key, g, a, out, cache):
        _check_out(out, self.k)
        if self._spec(key).factors is None:
            return super().project_outer(key, g, a, out, cache)
        scale = 1.0 / math.sqrt(self.s)
        B = g.shape[0]
        for r in range(self.s):
            sr, sc = self._signs(key, r, g.device)
            ga = cache.get((key, r))
            if ga is None:
                ga = (a * sc.to(a.dtype)[None, :, None]).transpose(1, 2)
                if scale != 1.0:
                    ga.mul_(scale)
                cache[(key, r)] = ga
            block = torch.bmm(g * sr.to(g.dtype)[None, :, None], ga).reshape(B, -1)
            out.index_add_(1, self._index(key, r, g.device), block.to(out.dtype))


class TensorSketchProjector(Projector):
    """Structured sketch that never materialises a Linear/Conv2d weight gradient when that is dearer.

    For an outer-product block with factors (rows, cols), entry (i, j) goes to bucket
    (h_row(i) + h_col(j)) mod k with sign s_row(i)·s_col(j) (a TensorSketch, Pham & Pagh 2013).
    Then sketch(Σ_t g_t a_tᵀ) = Σ_t CS_row(g_t) ⊛ CS_col(a_t), a circular convolution computed with
    real FFTs of length k in O(T·(rows + cols + k log k)) instead of O(T·rows·cols) — the win for
    the large, low-resolution layers where most parameters live. Each layer takes whichever path
    is cheaper (``outer_path="auto"``; ``"fft"`` / ``"materialise"`` force one, and ``calls``
    counts the blocks each path took); both give the same sketch. The remaining parameters (biases, norm affines) are
    computed exactly and CountSketched with independent hashes.

    Half-precision (bfloat16/float16) factors are count-sketched and transformed in float32, since
    torch.fft has no bfloat16 kernels and no CPU float16 ones. Count sketches use ``index_add_``:
    see the module docstring for what is bit-identical on CPU and CUDA.
    """

    name = "tensorsketch"

    def __init__(self, k: int, seed: int = 0, *, fft_max_bytes: int = 256 << 20, outer_path: str = "auto"):
        super().__init__(k, seed)
        if outer_path not in ("auto", "fft", "materialise"):
            raise DNTKError(f"unknown outer_path {outer_path!r}; use 'auto' (cost model), 'fft' or 'materialise'")
        self._cache = _DeviceCache()
        self.fft_max_bytes = fft_max_bytes
        self.outer_path = outer_path
        self.calls = {"fft": 0, "materialise": 0}  # outer-product blocks per path, for tests and benchmarks
        self._plain = SJLTProjector(k, seed=seed ^ 0x5EED, s=1)
        self.rowscaled_cache_bytes = 512 << 20   # per batch, for project_rowscaled's M matrices

    def bind(self, specs):
        super().bind(specs)
        self._plain.bind([BlockSpec(s.name, s.numel, None) for s in specs])
        return self

    def _hash(self, key, side, n, device):
        idx = self._cache.get((key, side, "h"), device,
                              lambda: torch.randint(0, self.k, (n,), generator=cpu_generator(self.seed, key, f"ts-h-{side}")))
        sg = self._cache.get((key, side, "s"), device,
                             lambda: random_signs(n, cpu_generator(self.seed, key, f"ts-s-{side}")))
        return idx, sg

    def _full(self, key, device):
        """Materialised (bucket, sign) of every entry of an outer-product block."""
        rows, cols = self._spec(key).factors

        def make_idx():
            hr, _ = self._hash(key, "row", rows, "cpu")
            hc, _ = self._hash(key, "col", cols, "cpu")
            return (hr[:, None] + hc[None, :]).remainder_(self.k).reshape(-1)

        def make_sign():
            _, sr = self._hash(key, "row", rows, "cpu")
            _, sc = self._hash(key, "col", cols, "cpu")
            return torch.outer(sr, sc).reshape(-1)

        return self._cache.get((key, "full-idx"), device, make_idx), self._cache.get((key, "full-sign"), device, make_sign)

    def project(self, key, block, out):
        _check_out(out, self.k)
        if self._spec(key).factors is None:
            return self._plain.project(key, block, out)
        idx, sign = self._full(key, block.device)
        out.index_add_(1, idx, (block * sign.to(block.dtype)).to(out.dtype))

    def _fft_is_cheaper(self, rows, cols, T, B) -> bool:
        """Whether the FFT path is the cheaper one for a [rows, cols] block of T factor columns. Per sample, the
        materialised block costs ≈ rows·cols·(1.2 + 0.025·T) ns (the hashed scatter of every entry dominates;
        the bmm's T multiply-adds per entry are cheap) and the FFT path ≈ T·k·(2.2 + 0.025·T)·log₂k/12 ns (a
        length-k real FFT per column t) — constants measured on this project's CPU (1 thread, B = 8, k = 4096)
        for blocks of 10–1,024 rows, 27–4,608 columns and T = 1–1,024, where the rule picks the faster path
        or one within 20% of it. A function of the shapes alone: the same choice, and bitwise the same
        features, on every run."""
        k = self.k
        dense = rows * cols * (1.2 + 0.025 * T)
        fft = T * k * (2.2 + 0.025 * T) * math.log2(k) / 12
        fits = B * T * (k // 2 + 1) * 8 * 2 <= self.fft_max_bytes
        return fits and fft < dense

    def project_rows(self, key, idx, vals, out):
        """A table gradient Σ_t e_{idx_t} vals_tᵀ: entry (idx_t, j) goes to bucket h_row(idx_t) + h_col(j) with sign
        s_row(idx_t)·s_col(j) — B·T·cols additions instead of forming and hashing [B, rows·cols] (summed in
        another order than the formed block when a sample repeats a row: equal to rounding)."""
        _check_out(out, self.k)
        spec = self._spec(key)
        B, T, cols = vals.shape
        if spec.factors is None or spec.factors[1] != cols:
            return super().project_rows(key, idx, vals, out)
        work = torch.float32 if vals.dtype in _HALF else vals.dtype
        k, dev = self.k, vals.device
        hr, sr = self._hash(key, "row", spec.factors[0], dev)
        hc, sc = self._hash(key, "col", cols, dev)
        where = (torch.arange(B, device=dev) * (2 * k))[:, None] + hr[idx]                    # [B, T]; < 2k past b·2k
        signed = vals.to(work) * sr.to(work)[idx][:, :, None] * sc.to(work)[None, None, :]
        buf = torch.zeros(B, 2 * k, dtype=work, device=dev)                                    # folded once: no modulo
        buf.view(-1).index_add_(0, (where[:, :, None] + hc[None, None, :]).reshape(-1), signed.reshape(-1))
        out += (buf[:, :k] + buf[:, k:]).to(out.dtype)

    def project_rowscaled(self, key, d, what, out, cache=None):
        """Σ_o d_b[o] · sketch(e_o Ŵ[o]ᵀ) = d_b @ M with M[o] = s_row(o) · roll(CS_col(Ŵ[o]), h_row(o)), [rows, k]:
        the same sums as projecting the formed [B, rows·cols] block, in another order (equal to rounding). M is
        formed once per batch and kept in ``cache`` (the engine's per-batch cache: the same Ŵ for every logit)
        while the cached M's stay under ``rowscaled_cache_bytes``; an M that does not fit is formed per call when
        that is cheaper than the block (k ≤ B·cols), else the block is formed."""
        _check_out(out, self.k)
        spec = self._spec(key)
        rows, cols = what.shape
        if spec.factors != (rows, cols):
            return super().project_rowscaled(key, d, what, out)
        work = torch.float32 if d.dtype in _HALF else d.dtype
        slot = ("rowscaled", key, id(what))
        m = cache.get(slot) if cache is not None else None
        if m is None:
            size = rows * self.k * torch.finfo(work).bits // 8
            keep = cache is not None and cache.get("rowscaled-bytes", 0) + size <= self.rowscaled_cache_bytes
            if not keep and self.k > d.shape[0] * cols:
                return super().project_rowscaled(key, d, what, out)
            m = self._rowscaled_matrix(key, what, work)
            if keep:
                cache[slot] = m
                cache["rowscaled-bytes"] = cache.get("rowscaled-bytes", 0) + size
        out += (d.to(work) @ m).to(out.dtype)

    def _rowscaled_matrix(self, key, what, work):
        """M [rows, k]: entry (o, j) of Ŵ, signed s_row(o)·s_col(j), added at bucket h_row(o) + h_col(j) of row o (in a
        row of 2k, folded once, so no index needs a modulo)."""
        rows, cols = what.shape
        k, dev = self.k, what.device
        hr, sr = self._hash(key, "row", rows, dev)
        hc, sc = self._hash(key, "col", cols, dev)
        m2 = torch.zeros(rows, 2 * k, dtype=work, device=dev)
        idx = (torch.arange(rows, device=dev) * (2 * k) + hr)[:, None] + hc[None, :]
        m2.view(-1).index_add_(0, idx.view(-1), (what.to(work) * sc.to(work)[None, :] * sr.to(work)[:, None]).view(-1))
        return m2[:, :k].add_(m2[:, k:])

    def _count_sketch(self, x, idx, sign):
        """x[B, n, T] → [B, T, k] with x's rows hashed into k buckets."""
        B, n, T = x.shape
        buf = torch.zeros(B, T, self.k, dtype=x.dtype, device=x.device)
        buf.index_add_(2, idx, (x * sign.to(x.dtype)[None, :, None]).transpose(1, 2))
        return buf

    def project_outer(self, key, g, a, out, cache):
        _check_out(out, self.k)
        spec = self._spec(key)
        B, rows, T = g.shape
        fft = self.outer_path == "fft" or (self.outer_path == "auto" and self._fft_is_cheaper(rows, a.shape[1], T, B))
        if spec.factors is None:
            self.calls["materialise"] += 1
            return super().project_outer(key, g, a, out, cache)
        if not fft:
            # the block's signs s_row(i)·s_col(j) folded into the factors (a sign flip is exact, so the block is
            # bitwise the one project() would sign), the column side cached across the logits of the batch
            self.calls["materialise"] += 1
            _, sr = self._hash(key, "row", rows, g.device)
            ga = cache.get((key, "signed-a"))
            if ga is None:
                _, sc = self._hash(key, "col", a.shape[1], a.device)
                ga = cache[(key, "signed-a")] = (a * sc.to(a.dtype)[None, :, None]).transpose(1, 2)
            block = torch.bmm(g * sr.to(g.dtype)[None, :, None], ga).reshape(B, -1)
            out.index_add_(1, self._full(key, g.device)[0], block.to(out.dtype))
            return
        self.calls["fft"] += 1
        # torch.fft has no bfloat16 kernels (CPU or CUDA) and float16 only on CUDA for powers of two:
        # half-precision factors are count-sketched and transformed in float32, and the result is
        # added in out's dtype (rounded once, like the other paths)
        work = torch.float32 if g.dtype in _HALF else g.dtype
        fa = cache.get(key)
        if fa is None:
            hc, sc = self._hash(key, "col", a.shape[1], a.device)
            fa = torch.fft.rfft(self._count_sketch(a.to(work), hc, sc), dim=-1)
            cache[key] = fa
        hr, sr = self._hash(key, "row", rows, g.device)
        fg = torch.fft.rfft(self._count_sketch(g.to(work), hr, sr), dim=-1)
        conv = torch.fft.irfft((fg * fa).sum(1), n=self.k, dim=-1)
        out += conv.to(out.dtype)
