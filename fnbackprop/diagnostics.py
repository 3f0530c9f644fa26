"""Gradient-flow diagnostics computed inside the training step, and the training plots.

Two per-layer quantities show how the error signal travels backwards through the network:

* ``‖∂L/∂W^l‖_F``: the Frobenius norm of the weight gradient of layer l (of the batch objective
  the optimiser receives, before any clipping);
* ``‖δ_i^l‖``: the norm of example i's delta ``δ_i^l = ∂ℓ_i/∂z_i^l`` at layer l, from the same
  backward pass (:func:`fnbackprop.backward`), averaged over the examples.

Vanishing gradients show up as norms that shrink from layer L down to layer 1, exploding ones as
norms that grow. 
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fnbackprop.network import Params

__all__ = ["layer_grad_norms", "delta_norm_sums", "plot_history"]


def layer_grad_norms(grads: Params) -> jax.Array:
    """Frobenius norms ``‖∂L/∂W^l‖_F`` of each layer's weight gradient.

    Args:
      grads: a gradient pytree like the parameters, one dict per layer (``{}`` for a layer
        without parameters, which is left out).

    Returns:
      ``(L_p,)``: one norm per layer with parameters, in order.
    """
    return jnp.stack([jnp.sqrt(jnp.sum(g["w"] * g["w"])) for g in grads if g])


def delta_norm_sums(delta: Sequence[jax.Array]) -> jax.Array:
    """Sums over the batch of the per-example delta norms ``Σ_i ‖δ_i^l‖``.

    Sums rather than means so that an epoch's mean is one division by the number of examples,
    however the batches are sized.

    Args:
      delta: per-example deltas ``δ^1 .. δ^L``, each ``(B, ...)`` (as in
        :attr:`fnbackprop.Backward.delta`); ``δ_i^l`` is row i with all its other axes.

    Returns:
      ``(L,)``: entry l − 1 is ``Σ_i ‖δ_i^l‖``.
    """
    return jnp.stack([jnp.sum(jnp.sqrt(jnp.sum(d * d, axis=tuple(range(1, d.ndim)))))
                      for d in delta])


def _atomic_savefig(fig, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _finite(v) -> float:
    return float("nan") if v is None else float(v)


def plot_history(history: Sequence[dict], out_dir: str, *,
                 task: str = "classification") -> list[str]:
    """Writes the training plots as PNG files (matplotlib, Agg backend) into ``out_dir``.

    * ``curves.png``: train/validation/test loss, and accuracy (classification) or R² (regression)
      per epoch;
    * ``gradient_flow.png``: per-layer ``‖∂L/∂W^l‖`` and mean ``‖δ^l‖`` per epoch (log scale),
      when the history has them.

    Args:
      history: the per-epoch metrics (the ``metrics.jsonl`` lines).
      out_dir: an existing folder.
      task: ``"classification"`` or ``"regression"``.

    Returns:
      The paths written (each written atomically: temporary file, then ``os.replace``).
    """
    # The object-oriented API with the Agg canvas: no pyplot, no global figure state, and no
    # interactive backend is ever touched (and pyplot's import is skipped: ~0.3 s).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def subplots():
        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)
        return fig, fig.subplots(1, 2)

    if not history:
        return []
    epochs = [h["epoch"] for h in history]
    metric = "accuracy" if task == "classification" else "r2"
    label = "accuracy" if task == "classification" else "R²"
    paths = []

    fig, (ax_l, ax_m) = subplots()
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        if f"{split}_loss" in history[0]:
            ax_l.plot(epochs, [_finite(h.get(f"{split}_loss")) for h in history], style,
                      label=split)
        if f"{split}_{metric}" in history[0]:
            ax_m.plot(epochs, [_finite(h.get(f"{split}_{metric}")) for h in history], style,
                      label=split)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    if all(_finite(h.get("train_loss")) > 0 for h in history):
        ax_l.set_yscale("log")
    ax_l.legend()
    ax_l.set_title("loss")
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel(label)
    ax_m.legend()
    ax_m.set_title(label)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    _atomic_savefig(fig, path)
    paths.append(path)

    if "grad_norm" not in history[0]:  # not logged (a private run)
        return paths
    num_layers = len(history[0]["grad_norm"])
    fig, (ax_g, ax_d) = subplots()
    for l in range(num_layers):
        g = [_finite(h["grad_norm"][l]) for h in history]
        d = [_finite(h["delta_norm"][l]) for h in history]
        ax_g.plot(epochs, g, label=f"layer {l + 1}")
        ax_d.plot(epochs, d, label=f"layer {l + 1}")
    for ax, title in ((ax_g, r"$\|\partial L/\partial W^l\|_F$ (mean over steps)"),
                      (ax_d, r"$\|\delta_i^l\|$ (mean over examples)")):
        vals = [v for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)]
        if vals and min(vals) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "gradient_flow.png")
    _atomic_savefig(fig, path)
    paths.append(path)
    return paths
