"""Reverse-mode differentiation of forward code written against the Array API.

A forward-only :class:`~anycnn.nn.module.Module` (one that defines ``forward`` and no
``backward``) is recorded as it runs: its operations on :class:`Variable` arrays, the functions
of their namespace, and the modules it calls (whose own backward, fused and compiled where
anycnn has it, is one node of the graph). See :mod:`.variable` for the graph and
:mod:`.namespace` for what is differentiable.
"""

from .mode import enable_grad, is_grad_enabled, no_grad
from .variable import Variable, backward

__all__ = ["Variable", "backward", "enable_grad", "is_grad_enabled", "no_grad"]
