"""Per-sample, per-logit parameter gradients, one parameter block at a time — correct or refuse.

How the engine works. One forward pass runs under a :class:`torch.overrides.TorchFunctionMode`
that sees every torch call. A call is *interesting* when one of its arguments is a trainable
parameter (matched by identity) or a tensor computed from parameters only:

- **derivations** — calls whose tensor arguments are parameters, parameter-derived tensors or
  constants, but no data (``w - w.mean()`` in a weight-standardised conv, ``g·v/‖v‖`` in
  weight norm, ``cls_token.expand(B, -1, -1)``, ``table[index]`` in Swin's relative position
  bias). They run on a per-pass *alias* of each parameter (a detached leaf that requires grad), so
  the derived tensor keeps an autograd graph back to its parameters.
- **consumptions** — calls that mix parameters (or derived tensors) with data. Each is computed
  on the aliases, its output is *recorded* (the graph node we differentiate against) and a clone
  is handed to the network, so later in-place operations cannot touch the recorded tensor.
  In-place consumptions (``x.mul_(gamma)``) are computed out of place and copied into ``x``.

Then, for each logit c, one backward of Σ_b f_c(x_b) to the recorded outputs gives every
sample's output gradient at once. Per-sample parameter gradients follow per recorded call:

=============  ==========================================================================  =========
path           calls                                                                        cost
=============  ==========================================================================  =========
``factored``   ``F.linear`` and ungrouped ``conv1d``/``conv2d`` with a parameter weight:     cheapest
               Σ_t g_t a_tᵀ handed to the projector as factors, never formed
``closed``     biases, norm affines (batch/layer/group norm), grouped/depthwise convs,     O(B·numel)
               embeddings: the per-sample block in closed form from the output gradient
               (an embedding's rows go to the sketch as index/row pairs, O(B·T·dim));
               a weight-standardised conv weight (checked, ``derivations.py``): factors
               plus a row-scaled Ŵ, sketched from Ŵ once per batch
``derived``    a closed-form call whose weight is a derived tensor: the per-sample block    O(B·numel)
               of the derived tensor is pulled back to its parameters by a batched vjp
``op-vjp``     any other call (layer scale ``x * gamma``, ``x + pos_embed``, ``cat`` with  O(B·op)
               a class token, ``multi_head_attention_forward``, ``conv3d``, ...): the
               call's own vjp with the output gradient masked to one sample at a time
=============  ==========================================================================  =========

Every path is exact; memory grows with the parameters of one call, never with the model's P.
Which path each parameter took is recorded (:attr:`GradientCapture.paths`).

Where the code is. What the engine knows about one op family is one *op rule* (:mod:`.rules`: linear
and matmul, conv, the norms, embedding; the attention rewrite), each declaring its torch functions
and how it records, plans, emits and recomputes a call, with its exactness argument and cost in its
docstring — a new fast path is a new rule (:func:`register`, docs/extending.md), checked against
brute-force autograd with the rule asserted taken by :func:`dntk.features.check_rule`. The recorder
is :mod:`.recorder`, the layout measurement :mod:`.layouts`, the batch checks :mod:`.checks`, the
per-logit accumulation and op-vjp :mod:`.emit`, and :mod:`.core` the capture that runs them.

Which entries belong to which sample. Nothing assumes the batch sits in dim 0 of a recorded
tensor (sequence-first ``[T, B, d]`` Linear inputs, ``[T·B, E]`` inside attention, ``[B·windows,
…]`` in Swin). On the first batch of every new call pattern the engine *measures* it: with
s_b = Σ_c r_c f_c(x_b) for random r, it backpropagates Σ_b s_b and, for each bit j of the sample
index, Σ_b 2^{bit_j(b)} s_b. An entry that feeds sample b only gets exactly 1× or 2× the first
gradient, which spells b in binary; an entry feeding several samples gets neither, and the
model is refused (it mixes the samples of a batch, so per-sample gradients of the batch are not
the model's gradients on single inputs). From the per-entry sample index the engine picks the
layout ``(dim, major|minor)`` that explains every entry (e.g. dim 1 for ``[T, B, d]``, dim 0
b-minor for ``[T·B, E]``); calls whose layout is not of that form use ``op-vjp`` with the
measured index map. Entries with zero gradient for a random combination of logits have zero
gradient for every logit (with probability one), so they cannot make the choice wrong.

When the measurement is unambiguous (one layout per recorded output) it is cached for that call
pattern (batch size, calls, parameters, output shapes), and each later batch of the pattern is
*verified* instead of measured: two backward passes, of Σ_b s_b and of Σ_b w_b s_b with w a random
permutation of 1..B, must agree entry by entry as w[sample] × plain (an entry feeding two samples is
off by at least its share), and the first sample run alone must give its batch logits. A batch that
fails is measured afresh — and refused if it mixes samples — so a model that mixes only on some
batches is still caught. The check is compared on the device and read back once per batch (a
measurement reads back hundreds of times). In a batch with integer inputs (token ids) every sample is
also run alone, measured or verified: mixing through integer values (routing, counting) bypasses the
gradient, and a coupling that spares sample 0 and the permuted rerun is caught only there.

BatchNorm: the model runs in eval mode (running statistics; mode restored afterwards). A norm
that uses batch statistics couples the samples and is refused.

The generic ``torch.func`` backend (``backend="func"``, vmap(jacrev) over the whole model) is kept
as an independent reference; it builds B·C·P numbers and is never chosen automatically.
"""

from .core import GradientCapture, Sink, track_rules
from .layouts import Layout, measure_layouts, split_batch
from .params import PATHS, ParameterTable, analysis_mode, check_logits, compiled_parts, parameter_table, random_forward_message
from .rules import NotHandled, OpRule, register, rules, unregister

__all__ = ["GradientCapture", "Sink", "track_rules", "PATHS", "ParameterTable", "parameter_table", "analysis_mode", "check_logits",
           "compiled_parts", "random_forward_message", "Layout", "measure_layouts", "split_batch", "OpRule",
           "NotHandled", "register", "unregister", "rules"]
