"""Layer types, one per module, each forward rule beside its backward rules.

Every layer offers the same small interface to the network machinery
(:mod:`fnbackprop.network`, :mod:`fnbackprop.backprop`, :mod:`fnbackprop.per_example`):

* ``output_shape(input_shape)``: the per-example output shape; raises ``ValueError`` for an input
  the layer does not take;
* ``param_shapes(input_shape)``, ``fans(input_shape)``: its parameters and their fan-in/out;
* ``forward(p, a) -> z``: the pre-activation;
* ``input_grad(p, delta, input_shape) -> ∂L/∂a``: from ``δ = ∂L/∂z``;
* ``grads(a, delta) -> {"w", "b"}``: the parameter gradient summed over the batch (through
  :func:`~fnbackprop.layers.dense.weight_grad`, the one place for ∂W = aᵀδ);
* ``norm_sq(a, delta)``: the squared per-example gradient norms, without materialising them
  where that is cheaper (layers with parameters).
"""

from fnbackprop.layers.conv1d import Conv1D
from fnbackprop.layers.dense import Dense, weight_grad, weight_grad_norm_sq
from fnbackprop.layers.flatten import Flatten

Layer = Dense | Conv1D | Flatten
"""Any layer."""

LAYER_TYPES: tuple[type, ...] = (Dense, Conv1D, Flatten)

__all__ = ["Dense", "Conv1D", "Flatten", "Layer", "LAYER_TYPES", "weight_grad",
           "weight_grad_norm_sq"]
