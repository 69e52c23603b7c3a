"""Deprecated: :func:`gradient_features` lives in :mod:`dntk.features.extract` (this module's old name,
``engine``, named neither its stage nor its function). Until 0.2 its names resolve there with a
DeprecationWarning."""

from ..deprecation import moved

__getattr__ = moved(__name__, {n: f"dntk.features.extract:{n}" for n in
                               ("gradient_features", "as_inputs", "model_device", "refuse_nonfinite", "_RowSink")},
                    remove_in="0.2")
