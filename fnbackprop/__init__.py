"""fnbackprop: backpropagation as explicit pure functions in JAX.

Public API::

    import fnbackprop as fb
    net = fb.MLP(sizes=(64, 32, 10), hidden="relu", output="softmax", loss="cross_entropy")
    params = fb.init(key, net, scheme="he_normal")
    fb.forward(net, params, x)                   # (B, n_L)
    fb.loss(net, params, x, y)                   # scalar
    fb.manual_grad(net, params, x, y)            # hand-derived δ recursion
    fb.autodiff_grad(net, params, x, y)          # jax.grad reference
    fb.check_gradients(net, params, x, y)        # report

    cnn = fb.Network(input_shape=(40, 1),        # (length, channels), channels last
                     layers=(fb.Conv1D(25, 5, activation="relu"), fb.Flatten(),
                             fb.Dense(10, activation="softmax")),
                     loss="cross_entropy")       # every function above takes it too
"""

from fnbackprop.activations import ACTIVATIONS, HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from fnbackprop import checks
from fnbackprop import parallel
from fnbackprop import privacy
from fnbackprop.backprop import Backward, autodiff_grad, backward, grads_from_backward, manual_grad
from fnbackprop.data import DATASETS, DataError, Dataset, load_dataset
from fnbackprop.gradcheck import GradCheckReport, GradCheckRow, check_gradients
from fnbackprop.losses import loss
from fnbackprop.layers import Conv1D, Dense, Flatten
from fnbackprop.network import (
    INIT_SCHEMES,
    LOSSES,
    MLP,
    ForwardTrace,
    Network,
    forward,
    forward_trace,
    init,
)
from fnbackprop.per_example import (
    PER_EXAMPLE_METHODS,
    clipped_grad,
    clipped_grad_and_norms,
    clipped_grads_from_backward,
    per_example_grad_norms,
    per_example_grads,
)
from fnbackprop.training import TrainConfig, TrainResult, default_config, train

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "HIDDEN_ACTIVATIONS",
    "OUTPUT_ACTIVATIONS",
    "INIT_SCHEMES",
    "LOSSES",
    "MLP",
    "Backward",
    "ForwardTrace",
    "GradCheckReport",
    "GradCheckRow",
    "autodiff_grad",
    "backward",
    "check_gradients",
    "forward",
    "forward_trace",
    "init",
    "loss",
    "manual_grad",
    "DATASETS",
    "DataError",
    "Dataset",
    "load_dataset",
    "PER_EXAMPLE_METHODS",
    "clipped_grad",
    "clipped_grad_and_norms",
    "per_example_grad_norms",
    "per_example_grads",
    "TrainConfig",
    "TrainResult",
    "default_config",
    "train",
    "grads_from_backward",
    "parallel",
    "privacy",
    "Network",
    "Dense",
    "Conv1D",
    "Flatten",
    "clipped_grads_from_backward",
    "checks",
]
