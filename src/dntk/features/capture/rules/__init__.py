"""Op rules as a registry (see :mod:`.base` for the contract): one module per op family; importing
this package registers the built-in rules."""

from . import attention, conv, embedding, linear, norms  # noqa: F401  (each registers its rules)
from .base import NotHandled, OpRule, arg, register, register_rewrite, rewrite_for, rule_for, rules, run_step, unregister

__all__ = ["OpRule", "NotHandled", "arg", "register", "unregister", "rule_for", "rules", "register_rewrite", "rewrite_for", "run_step",
           "attention", "conv", "embedding", "linear", "norms"]
