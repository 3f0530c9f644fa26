"""Writes mlp_reference.json: MLP parameters and results of the core before the layers refactor.

Run once with the code of commit 4473bf7 on the path (``git archive 4473bf7 | tar -x -C DIR``,
then ``PYTHONPATH=DIR python tests/data/make_mlp_reference.py``); tests/test_network.py checks
that today's MLP gives the same numbers.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import fnbackprop as fb  # noqa: E402


def leaves(tree):
    return [np.asarray(v).tolist() for v in jax.tree.leaves(tree)]


def main():
    out = {"commit": "4473bf7", "init": {}}
    net = fb.MLP((5, 7, 6, 3), "tanh", "softmax", "cross_entropy")
    for scheme in fb.INIT_SCHEMES:
        for dtype in ("float64", "float32"):
            out["init"][f"{scheme}/{dtype}"] = leaves(fb.init(jax.random.key(3), net, scheme, dtype))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    y = jnp.asarray([0, 2, 1, 1])
    p = fb.init(jax.random.key(3), net, "nielsen")
    drop = dict(dropout=0.3, key=jax.random.key(1))
    noise = dict(noise_multiplier=1.0, key=jax.random.key(2))
    results = {
        "forward": fb.forward(net, p, x),
        "loss": fb.loss(net, p, x, y, l1=0.01, l2=0.1),
        "loss_dropout": fb.loss(net, p, x, y, **drop),
        "manual_grad": fb.manual_grad(net, p, x, y, l1=0.01, l2=0.1),
        "manual_grad_dropout": fb.manual_grad(net, p, x, y, **drop),
        "per_example_grads": fb.per_example_grads(net, p, x, y),
        "per_example_grad_norms": fb.per_example_grad_norms(net, p, x, y, per_layer=True),
        "clipped_grad": fb.clipped_grad(net, p, x, y, 0.5),
        "clipped_grad_noise": fb.clipped_grad(net, p, x, y, 0.5, **noise),
        "clipped_grad_per_layer_noise": fb.clipped_grad(net, p, x, y, 0.5, per_layer=True, **noise),
        "dropout_masks": fb.network.dropout_masks(net, jax.random.key(5), 0.4, 4, jnp.float64),
    }
    out["results"] = {k: leaves(v) for k, v in results.items()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp_reference.json")
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
