"""Random projections of per-sample gradients: one interface, several sketches.

``make(name, k=..., seed=...)`` returns a :class:`Projector`. Every projector is a fixed linear
map S ∈ R^{P×k} scaled so that E⟨Sᵀg, Sᵀg'⟩ = ⟨g, g'⟩, generated block by block from the seed —
the same seed gives the same map whatever the batch size, order, process or device.

=============  ==============================================  ===================  ===========================
name           map                                             cost per gradient    kernel error at k (rel. F)
=============  ==============================================  ===================  ===========================
identity       exact (k = P)                                   O(P) memory          0
gaussian       dense N(0, 1/k), regenerated chunk by chunk     O(P·k) + P·k RNG     ≈ √(2/k)-scale JL error
rademacher     dense ±1/√k, regenerated chunk by chunk         O(P·k) + P·k RNG     same as gaussian
sjlt           s hashed buckets per coordinate (s=1:           O(P·s)               same as gaussian (measured)
               CountSketch); default
tensorsketch   CountSketch with bucket h(i)+h(j) mod k on       O(T·(r+c+k log k))   slightly above sjlt
               weights, evaluated by FFT without forming the    per layer when
               weight gradient when that is cheaper             cheaper
=============  ==============================================  ===================  ===========================

The default (``DEFAULT``) was chosen by ``benchmarks/bench_features.py`` (speed at equal error);
the measured table is in docs/benchmarks.md.
"""

from .base import BlockSpec, Projector, block_seed
from .registry import DEFAULT, NAMES, make
from .sketches import DenseProjector, IdentityProjector, SJLTProjector, TensorSketchProjector

__all__ = ["make", "Projector", "BlockSpec", "DEFAULT", "NAMES", "block_seed",
           "IdentityProjector", "DenseProjector", "SJLTProjector", "TensorSketchProjector"]
