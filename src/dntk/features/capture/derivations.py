"""Closed forms for derived weights: a weight computed from one parameter by a per-row standardisation
(weight standardisation — timm's ``StdConv2d``/``StdConv1d``, BiT's ResNetV2 — computes
Ŵ[o] = (W[o] − mean W[o]) / sqrt(var W[o] + eps) over each output row o of n = numel / rows entries).

Exactness. For such a Ŵ the pull-back of a gradient G [rows, n] of Ŵ to W is the batch-norm backward

    ∂/∂W = (1/σ) (G − mean_j(G) 1ᵀ − Ŵ ⊙ mean_j(G ⊙ Ŵ)),   σ[o] = sqrt(var W[o] + eps),

linear in G, exact with any eps (eps enters only through σ). The derivation is not recognised by the
calls that made it but by what it is: :func:`row_standardisation` recovers σ from the values
(σ[o] = ⟨W[o] − mean, Ŵ[o]⟩ / ⟨Ŵ[o], Ŵ[o]⟩), checks Ŵ·σ = W − mean on every entry, then checks the closed
form against autograd's own vjp of the derivation, row by row, on a random cotangent and on the two
directions of its rank-one corrections (Ŵ and the ones), each to 1e-10 (float64) or 3e-5 (float32) of
‖v[o]‖/σ[o]: two linear maps that differ, differ on a random vector with probability one, and a
look-alike that differs only along Ŵ (an unbiased std, eps outside the root: ~1/n there) or 1 (a
detached mean) is caught on that direction. A look-alike off by less than 3e-5 there (n > ~30,000
entries per row) would pass with an error of that size, about float32's rounding of such rows. Anything else — several roots, another shape, half precision, a
failed check — keeps the generic batched vjp (``derived``). One check per derived tensor per batch.

With G = Σ_t g_t a_tᵀ (a conv's factors) the pull-back stays factored:

    (1/σ) G − (r/n) 1ᵀ − diag(c/n) Ŵ,   r[o] = Σ_t (g_t[o]/σ[o]) Σ_j a_t[j],   c[o] = Σ_t (g_t[o]/σ[o]) (Ŵ a_t)[o],

factors [g/σ, −r/n] against [a, 1] plus a row-scaled copy of the fixed Ŵ, which a projector sketches
from Ŵ once per call (:meth:`dntk.projection.Projector.project_rowscaled`) instead of per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_UNSET = object()


@dataclass
class RowStandardisation:
    root: str                    # the parameter W
    what: torch.Tensor           # Ŵ [rows, n] (the derived tensor, detached), in its dtype
    inv_sigma: torch.Tensor      # 1/σ [rows]

    @property
    def n(self) -> int:
        return self.what.shape[1]

    def pull_back(self, G: torch.Tensor) -> torch.Tensor:
        """[B, rows, n] gradients of Ŵ → [B, rows, n] gradients of W."""
        w = self.what.to(G.dtype)
        out = G - G.mean(-1, keepdim=True)
        out.sub_((G * w).mean(-1, keepdim=True) * w)
        return out.mul_(self.inv_sigma.to(G.dtype)[:, None])


def _closed64(v: torch.Tensor, what: torch.Tensor, inv_sigma: torch.Tensor) -> torch.Tensor:
    return (v - v.mean(-1, keepdim=True) - (v * what).mean(-1, keepdim=True) * what) * inv_sigma[:, None]


def row_standardisation(src) -> RowStandardisation | None:
    """The derivation of ``src`` (a :class:`~dntk.features.capture.recorder.Source` of a derived weight) when
    it is a per-row standardisation of its single root parameter, checked as the module docstring says;
    None otherwise. Cached on the Source (one check per batch)."""
    cached = getattr(src, "std", _UNSET)
    if cached is not _UNSET:
        return cached
    src.std = None
    D, W = src.tensor, src.root
    if (src.param is not None or W is None or len(src.roots) != 1 or not isinstance(D, torch.Tensor)
            or D.shape != W.shape or W.dim() < 2 or D.dtype not in (torch.float32, torch.float64)
            or W.dtype != D.dtype or not D.requires_grad):
        return None
    rows = W.shape[0]
    n = W.numel() // max(rows, 1)
    if rows == 0 or n < 3 or n > 1 << 15:
        return None
    with torch.no_grad():
        d = D.detach().reshape(rows, n).double()
        wc = W.detach().reshape(rows, n).double()
        wc = wc - wc.mean(1, keepdim=True)
        dd = (d * d).sum(1)
        if not bool(torch.isfinite(d).all()) or not bool((dd > 0).all()):
            return None
        sigma = (wc * d).sum(1) / dd
        if not bool((sigma > 0).all()):
            return None
        rtol = 1e-10 if D.dtype == torch.float64 else 1e-5
        if bool(((d * sigma[:, None] - wc).abs() > rtol * 10 * wc.abs().amax(1, keepdim=True)).any()):
            return None
    # the pull-back against autograd's, row by row, on three cotangents: a random one (any other structure), Ŵ
    # itself and the ones — the two directions of the closed form's rank-one corrections, where a look-alike
    # (an unbiased std, eps outside the root: off by ~1/n there) differs most; each row to tol·‖v[o]‖/σ[o], the
    # scale of the terms that cancel in it
    gen = torch.Generator().manual_seed(0x57D)
    tol = 1e-10 if D.dtype == torch.float64 else 3e-5
    for v in (torch.randn((rows, n), generator=gen).to(device=D.device, dtype=torch.float64), d,
              torch.ones_like(d)):
        (auto,) = torch.autograd.grad(D, W, v.reshape(D.shape).to(D.dtype), retain_graph=True, allow_unused=True)
        if auto is None:
            return None
        closed = _closed64(v, d, 1 / sigma)
        err = (auto.reshape(rows, n).double() - closed).norm(dim=1)
        if bool((err > tol * v.norm(dim=1) / sigma).any()):
            return None
    src.std = RowStandardisation(src.roots[0], D.detach().reshape(rows, n), (1 / sigma).to(D.dtype))
    return src.std
