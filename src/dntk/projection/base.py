"""The projector contract shared by every sketch.

A projector maps a per-sample gradient θ-vector (P numbers) to k numbers with a fixed linear map
S ∈ R^{P×k}, scaled so that E⟨Sᵀg, Sᵀg'⟩ = ⟨g, g'⟩. The engine never builds whole gradients: it
hands the projector one *parameter block* at a time (one ``nn.Parameter``), either

- materialised, ``block[B, numel]`` (:meth:`Projector.project`), or
- as the two factors of a weight gradient that is a sum of outer products,
  ``G_b = Σ_t g_b[:, t] a_b[:, t]ᵀ`` with ``g[B, rows, T]`` and ``a[B, cols, T]``
  (:meth:`Projector.project_outer`) — Linear and Conv2d weights arrive this way.

Both calls *add* into ``out[B, k]``, so a gradient's sketch is the sum over its blocks, and a
parameter used twice (tied weights) simply contributes twice.

Reproducibility: every random quantity of block ``name`` comes from a generator seeded by a hash of
``(seed, name, purpose)`` on the CPU, then moved to the block's device. So the map S depends only on
the seed and the model's parameter names and shapes — never on batch size, batch order, the process,
or the device. Whether the *features* (S applied by floating-point sums) are bitwise identical
depends on the device: see :mod:`dntk.projection.sketches` (CPU: yes; CUDA: to float rounding, or
bitwise run to run only under ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import DNTKError, require_int


@dataclass(frozen=True)
class BlockSpec:
    """One trainable parameter as the projector sees it.

    name: stable key (the parameter's name in ``model.named_parameters()``).
    numel: number of entries of the parameter.
    factors: (rows, cols) with rows·cols == numel when the parameter is a weight whose per-sample
        gradient arrives as outer-product factors (Linear: (out, in); Conv2d: (out, in·kh·kw));
        None otherwise.
    """

    name: str
    numel: int
    factors: tuple[int, int] | None = None


def block_seed(seed: int, name: str, purpose: str) -> int:
    """A 63-bit seed for one block and one purpose, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}|{name}|{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def cpu_generator(seed: int, name: str, purpose: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(block_seed(seed, name, purpose))
    return gen


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """±1 float32 vector of length n (CPU)."""
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def table_gradient(idx: torch.Tensor, vals: torch.Tensor, rows: int) -> torch.Tensor:
    """The formed table gradient G_b = Σ_t e_{idx[b, t]} vals[b, t]ᵀ: [B, rows, cols] from idx [B, T] and
    vals [B, T, cols], by a scatter-add (rows repeated within a sample summed)."""
    G = torch.zeros(vals.shape[0], rows, vals.shape[-1], dtype=vals.dtype, device=vals.device)
    return G.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, vals.shape[-1]), vals)


class Projector:
    """Base class: a linear map R^P → R^k applied block by block. Subclasses set ``name``."""

    name: str = "projector"

    def __init__(self, k: int | None, seed: int = 0):
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int):
                raise DNTKError(f"projection dimension k must be a positive integer, got {k!r}")
            if k <= 0:
                raise DNTKError(f"projection dimension k must be positive, got k={k}; pick e.g. k=4096")
        self.k = k
        self.seed = int(seed)
        self.specs: dict[str, BlockSpec] = {}
        self.num_params = 0

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, specs: list[BlockSpec]) -> "Projector":
        """Tell the projector which blocks exist. Idempotent for the same specs."""
        self.specs = {s.name: s for s in specs}
        self.num_params = sum(s.numel for s in specs)
        return self

    def _spec(self, key: str) -> BlockSpec:
        try:
            return self.specs[key]
        except KeyError:
            raise DNTKError(f"projector was not bound to a parameter named {key!r}; call bind() with the model's blocks") from None

    @property
    def dim(self) -> int:
        """Output dimension k."""
        if self.k is None:
            raise DNTKError(f"{self.name} projector is not bound yet, so its dimension is unknown")
        return self.k

    # -- application -------------------------------------------------------------------------------
    def project(self, key: str, block: torch.Tensor, out: torch.Tensor) -> None:
        """out[B, k] += block[B, numel] @ S_key.  Subclasses implement."""
        raise NotImplementedError

    def project_outer(self, key: str, g: torch.Tensor, a: torch.Tensor, out: torch.Tensor, cache: dict) -> None:
        """out[B, k] += vec(Σ_t g[:, :, t] a[:, :, t]ᵀ) @ S_key, with g[B, rows, T], a[B, cols, T].

        ``cache`` lives for one batch; projectors may keep a-side transforms there, since the engine
        calls this once per logit with the same ``a``. The default materialises the weight gradient.
        """
        block = torch.bmm(g, a.transpose(1, 2)).reshape(g.shape[0], -1)
        self.project(key, block, out)

    def project_rows(self, key: str, idx: torch.Tensor, vals: torch.Tensor, out: torch.Tensor) -> None:
        """out[B, k] += vec(G_b) @ S_key for a table gradient G_b = Σ_t e_{idx[b, t]} vals[b, t]ᵀ (an embedding's:
        idx [B, T] rows of the [rows, cols] table, vals [B, T, cols]). The default forms the [B, rows·cols]
        block by a scatter-add; a projector can add the B·T·cols entries straight into its buckets
        (tensorsketch)."""
        G = table_gradient(idx, vals, self._spec(key).numel // vals.shape[-1])
        self.project(key, G.reshape(G.shape[0], -1), out)

    def project_rowscaled(self, key: str, d: torch.Tensor, what: torch.Tensor, out: torch.Tensor,
                          cache: dict | None = None) -> None:
        """out[B, k] += vec(diag(d_b) Ŵ) @ S_key, with d [B, rows] and a fixed Ŵ [rows, cols] (the row-scaled
        term of a standardised weight's gradient). ``cache`` is the engine's per-batch cache (the same Ŵ for
        every logit). The default forms the [B, rows·cols] block; a projector can sketch Ŵ once instead
        (tensorsketch)."""
        self.project(key, (d[:, :, None] * what.to(d.dtype)[None]).reshape(d.shape[0], -1), out)

    def matrix(self, dtype=torch.float64, *, max_numbers: int = 50_000_000, max_unit_entries: int = 1 << 31,
               chunk_numbers: int = 1 << 22) -> torch.Tensor:
        """The whole map S as a dense [P, k] matrix, by projecting unit vectors. For tests and
        small models only.

        Cost: the result holds P·k numbers (refused above ``max_numbers``); the unit vectors of a
        block are fed in row chunks of at most ``chunk_numbers`` entries (at least one row), so
        the identity [numel, numel] is never built whole; the work is Σ numel² over blocks (refused
        above ``max_unit_entries``). Peak memory ≈ P·k numbers + one chunk + one [rows, k] buffer."""
        k = self.dim
        if self.num_params * k > max_numbers:
            raise DNTKError(f"matrix() would hold P·k = {self.num_params * k:,} numbers (limit {max_numbers:,}); it is "
                            f"meant for small models — use project() on the vectors you need, or pass a larger max_numbers")
        work = sum(spec.numel ** 2 for spec in self.specs.values())
        if work > max_unit_entries:
            big = max(self.specs.values(), key=lambda sp: sp.numel)
            raise DNTKError(f"matrix() would project Σ numel² = {work:,} unit-vector entries (limit {max_unit_entries:,}; "
                            f"largest block {big.name!r} has numel {big.numel:,}); it is meant for small models — use "
                            f"project() on the vectors you need, or pass a larger max_unit_entries")
        require_int(chunk_numbers, "chunk_numbers", 1, "pass how many unit-vector entries to project at once")
        rows = []
        for spec in self.specs.values():
            step = max(1, chunk_numbers // spec.numel)
            for start in range(0, spec.numel, step):
                n = min(step, spec.numel - start)
                unit = torch.zeros(n, spec.numel, dtype=torch.float32)
                unit[torch.arange(n), torch.arange(start, start + n)] = 1.0
                out = torch.zeros(n, k, dtype=torch.float32)
                self.project(spec.name, unit, out)
                rows.append(out.to(dtype))
        return torch.cat(rows, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, seed={self.seed})"


def chunk_rows(k: int, target_numbers: int = 1 << 22) -> int:
    """Rows per generated chunk of a dense map so that one chunk holds ~target_numbers entries."""
    return max(1, target_numbers // max(k, 1))


def _check_out(out: torch.Tensor, k: int) -> None:
    if out.shape[-1] != k:
        raise DNTKError(f"output buffer has {out.shape[-1]} columns but the projector has k={k}")

