"""One optimisation step and the compiled epoch.

A step takes the rows ``idx`` of the training set (with a mask of the real rows), augments
them, computes the gradient of the batch objective

    ``L = Σ_i w_i ℓ_i + penalty``,   ``w_i = m_i / D``

(``m_i``: the mask, ``D``: the number of real rows), with the hand-derived backward pass
(:func:`fnbackprop.backward` weighted by ``w``, then :func:`fnbackprop.grads_from_backward`),
``jax.grad`` (``gradient="autodiff"``) or per-example clipping
(:func:`fnbackprop.clipped_grads_from_backward`: the same backward pass, per example), and
applies the optax update. A step whose objective or gradient is not finite is skipped
(parameters and optimizer state kept) and counted — except with DP noise, where whether a step
happens must not depend on the data: there an example whose gradient is not finite contributes
nothing (see :func:`fnbackprop.clipped_grads_from_backward`) and every step is taken.

An epoch is one ``lax.scan`` over its steps, compiled once per :class:`StepSpec`. Data
parallelism (:mod:`fnbackprop.parallel`) wraps the gradient of the rows a device holds:
``sharding`` constrains the batch to the mesh inside the one ``jit``; ``pmap`` maps the epoch
over the local devices and adds the devices' sums with ``psum``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnbackprop import parallel as parallel_lib
from fnbackprop.backprop import backward, grads_from_backward
from fnbackprop.diagnostics import delta_norm_sums
from fnbackprop.losses import penalty, penalty_grad, per_example_loss, prepare_targets
from fnbackprop.network import Params, forward_trace
from fnbackprop.per_example import add_noise, clipped_grads_from_backward
from fnbackprop.training.augmentation import augment
from fnbackprop.training.config import MOMENTUM

__all__ = [
    "TrainState",
    "EpochStats",
    "OptimizerSpec",
    "StepSpec",
    "make_optimizer",
    "make_schedule",
    "make_epoch",
    "compile_epoch",
]


class TrainState(NamedTuple):
    """What every step carries: parameters, optimizer state and the step PRNG key."""

    params: Params
    opt_state: Any
    key: jax.Array


class EpochStats(NamedTuple):
    """Sums over an epoch's finite steps (skipped steps count only in ``skipped``).

    Attributes:
      loss_sum: ``Σ_s Σ_i m_i (ℓ_i + penalty)``: the objective the steps descended, summed over
        their real rows.
      examples: ``Σ_s Σ_i m_i``.
      grad_norm: ``(L,)`` ``Σ_s ‖∂L/∂W^l‖_F`` of the step gradients.
      delta_sum: ``(L,)`` ``Σ_s Σ_i m_i ‖δ_i^l‖``.
      ok_steps: the number of finite steps.
      skipped: the number of skipped (non-finite) steps.
    """

    loss_sum: jax.Array
    examples: jax.Array
    grad_norm: jax.Array
    delta_sum: jax.Array
    ok_steps: jax.Array
    skipped: jax.Array


class OptimizerSpec(NamedTuple):
    """The optax optimiser of a run: name, peak learning rate, schedule, gradient clipping."""

    name: str
    lr: float
    schedule: str
    total_steps: int
    clip_norm: float | None = None
    clip_value: float | None = None


class StepSpec(NamedTuple):
    """Everything the compiled epoch depends on besides its array arguments (hashable).

    Built from the run's configuration and data by :func:`fnbackprop.training.prepare.prepare`:
    exactly the settings that enter the computation, so runs that differ in anything else
    share one compiled epoch within a process.
    """

    net: Any
    optimizer: OptimizerSpec
    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    per_example_clip: float | None = None
    noise_multiplier: float = 0.0
    gradient: str = "manual"
    augment: str = "none"
    image_shape: tuple[int, ...] | None = None
    batch: int = 1
    masked: bool = False
    denominator: float | None = None  # of every step's mean; None: its number of real rows
    physical_batch: int | None = None
    skip_non_finite: bool = True
    diagnostics: bool = True
    mode: str = "single"          # "single", "sharding" or "pmap"
    devices: int = 1              # pmap: the number of devices the batch is split over
    mesh: Any = None              # sharding: the data mesh


def make_schedule(opt: OptimizerSpec):
    """The learning rate per step: ``constant``, ``cosine`` (to 0 over all steps),
    ``exponential`` (to 1 % of ``lr`` at the last step), ``step`` (×0.1 at 50 % and 75 %)."""
    lr, total = float(opt.lr), max(int(opt.total_steps), 1)
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    if opt.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total)
    if opt.schedule == "exponential":
        return optax.exponential_decay(lr, transition_steps=total, decay_rate=0.01)
    b1, b2 = max(total // 2, 1), max((3 * total) // 4, 1)
    return optax.piecewise_constant_schedule(lr, {b1: 0.1, b2: 0.1} if b2 > b1 else {b1: 0.01})


def make_optimizer(opt: OptimizerSpec) -> optax.GradientTransformation:
    """The optax transformation: optional ``clip_by_global_norm`` / ``clip``, then the optimiser."""
    lr = float(opt.lr) if opt.schedule == "constant" else make_schedule(opt)
    base = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=MOMENTUM),
        "nesterov": lambda: optax.sgd(lr, momentum=MOMENTUM, nesterov=True),
        "adam": lambda: optax.adam(lr),
        "rmsprop": lambda: optax.rmsprop(lr),
    }[opt.name]()
    parts = []
    if opt.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    if opt.clip_value is not None:
        parts.append(optax.clip(float(opt.clip_value)))
    return optax.chain(*parts, base)


def _data_gradient(spec: StepSpec):
    """``(params, x, y, mask, denom, key) -> (loss_sum, grads, delta_sum, examples)``.

    Every output is a sum over the rows given, so the rows may be a device's shard: ``grads`` is
    the gradient of ``Σ_i w_i ℓ_i`` (``w_i = m_i / denom``), ``loss_sum = Σ_i m_i ℓ_i``,
    ``delta_sum = Σ_i m_i ‖δ_i^l‖`` (zeros without diagnostics), ``examples = Σ_i m_i``.
    """
    if spec.per_example_clip is not None:
        return _clipped_gradient(spec)
    net = spec.net

    def data_gradient(params, x, y, mask, denom, key):
        k_drop, _ = jax.random.split(key)
        if spec.mode == "pmap":  # each device draws the dropout masks of its own rows
            k_drop = jax.random.fold_in(k_drop, jax.lax.axis_index(parallel_lib.DATA_AXIS))
        m = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
        w = None if mask is None else m / denom
        y_t = _targets(net, y, x.dtype)
        bw = backward(net, params, x, y_t, dropout=spec.dropout,
                      key=k_drop if spec.dropout > 0 else None, weights=w)
        loss_sum = _loss_sum(net, bw.trace, y_t, mask)
        if spec.gradient == "autodiff":
            grads = jax.grad(lambda p: _weighted_loss(net, p, x, y_t, m / denom, bw.trace.masks)
                             )(params)
        else:
            grads = grads_from_backward(params, bw, scale=None if w is not None else 1.0 / denom,
                                        net=net)
        # The weighted deltas are w_i δ_i: Σ_i ‖w_i δ_i‖ · denom = Σ_i m_i ‖δ_i‖.
        delta_sum = _delta_sums(spec, params, bw.delta) * (denom if w is not None else 1.0)
        return loss_sum, grads, delta_sum, jnp.sum(m)

    return data_gradient


def _clipped_gradient(spec: StepSpec):
    """:func:`_data_gradient` with per-example clipping (and DP noise): the rows are processed in
    chunks of ``spec.physical_batch`` (all at once without it), their clipped sums accumulated,
    and the noise is drawn once. Non-finite examples contribute nothing (nan-safe)."""
    net, clip = spec.net, spec.per_example_clip
    noise = spec.noise_multiplier / spec.devices  # the devices' noises add up (same key)

    def chunk_sums(params, x, y, mask, denom):
        y_t = _targets(net, y, x.dtype)
        bw = backward(net, params, x, y_t)
        loss_sum = _loss_sum(net, bw.trace, y_t, mask)
        grads, _ = clipped_grads_from_backward(net, params, bw, clip, mask=mask,
                                               normalize_by=denom)
        m = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
        delta = bw.delta if mask is None else [d * m.reshape((-1,) + (1,) * (d.ndim - 1))
                                               for d in bw.delta]
        return loss_sum, grads, _delta_sums(spec, params, delta), jnp.sum(m)

    def data_gradient(params, x, y, mask, denom, key):
        rows, chunk = x.shape[0], spec.physical_batch
        if chunk is None or chunk >= rows:
            sums = chunk_sums(params, x, y, mask, denom)
        else:
            mask = jnp.ones((rows,), bool) if mask is None else mask
            split = lambda v: v.reshape((rows // chunk, chunk) + v.shape[1:])  # noqa: E731
            zero = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
                chunk_sums, params, x[:chunk], y[:chunk], mask[:chunk], denom))
            sums, _ = jax.lax.scan(
                lambda acc, c: (jax.tree_util.tree_map(jnp.add, acc,
                                                       chunk_sums(params, *c, denom)), None),
                zero, (split(x), split(y), split(mask)))
        loss_sum, grads, delta_sum, examples = sums
        if noise > 0:  # drawn once per step, from the same key on every device
            grads = add_noise(grads, noise, clip, denom, jax.random.split(key)[1])
        return loss_sum, grads, delta_sum, examples

    return data_gradient


def _targets(net, y, dtype):
    """``(B, n_L)`` targets of labels validated when the data were loaded (no checking op)."""
    return prepare_targets(net, y, y.shape[0], dtype, checked=True)


def _loss_sum(net, trace, y_t, mask):
    """``Σ_i m_i ℓ_i`` from a forward trace and prepared targets."""
    losses = per_example_loss(net, trace.z[-1], trace.a[-1], y_t)
    return jnp.sum(losses if mask is None else jnp.where(mask, losses, 0.0))


def _delta_sums(spec: StepSpec, params, delta) -> jax.Array:
    """``Σ_i ‖δ_i^l‖`` per layer with parameters, for the diagnostics (zeros when off)."""
    delta = [d for d, p in zip(delta, params) if p]
    if not spec.diagnostics:
        return jnp.zeros((len(delta),), delta[0].dtype)
    return delta_norm_sums(delta)


def _weighted_loss(net, params, x, y_t, w, masks):
    """``Σ_i w_i ℓ_i`` through the forward pass (the autodiff reference of the step)."""
    out = forward_trace(net, params, x, masks)
    return jnp.sum(w * per_example_loss(net, out.z[-1], out.a[-1], y_t))


def _with_penalty(spec: StepSpec, params, grads):
    if not (spec.l1 or spec.l2):
        return grads
    return [{"w": g["w"] + penalty_grad(p["w"], spec.l1, spec.l2), "b": g["b"]} if p else g
            for g, p in zip(grads, params)]


def make_epoch(spec: StepSpec, tx: optax.GradientTransformation | None = None):
    """The pure epoch ``(state, idx, mask, x, y) -> (state, EpochStats)``.

    ``tx``: the optax transformation (default: :func:`make_optimizer` of ``spec.optimizer``).

    ``idx``: ``(steps, B)`` row indices; ``mask``: ``(steps, B)`` bool or ``None``
    (see :class:`fnbackprop.training.sampling.Batches`); ``x, y``: the whole training set.
    Under ``mode="pmap"`` it runs inside ``pmap`` and each device takes its ``B/D`` columns.
    """
    tx = make_optimizer(spec.optimizer) if tx is None else tx
    data_gradient = _data_gradient(spec)
    if spec.mode == "sharding":
        data_gradient = parallel_lib.sharded(data_gradient, spec.mesh, batch_argnums=(1, 2, 3))
    elif spec.mode == "pmap":
        data_gradient = parallel_lib.summed_over_devices(data_gradient)

    def step(state: TrainState, x, y, mask, denom):
        key, k_step = jax.random.split(state.key)
        k_aug, k_grad = jax.random.split(k_step)
        if spec.mode == "pmap":  # each device augments its own rows
            k_aug = jax.random.fold_in(k_aug, jax.lax.axis_index(parallel_lib.DATA_AXIS))
        if spec.augment != "none":
            x = augment(k_aug, x, spec.augment, spec.image_shape)
        x = x.reshape((x.shape[0], *spec.net.input_shape))  # the data are stored flat
        loss_sum, grads, delta_sum, examples = data_gradient(state.params, x, y, mask, denom,
                                                             k_grad)
        grads = _with_penalty(spec, state.params, grads)
        objective = loss_sum + examples * penalty(state.params, spec.l1, spec.l2)
        dt = objective.dtype
        if spec.diagnostics or spec.skip_non_finite:
            sq_w = jnp.stack([jnp.sum(g["w"] * g["w"]) for g in grads if g])
            sq_b = jnp.stack([jnp.sum(g["b"] * g["b"]) for g in grads if g])
        else:
            sq_w = sq_b = jnp.zeros((sum(1 for g in grads if g),), dt)

        def apply(po):
            params, opt_state = po
            updates, new_opt = tx.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_opt)
            return jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, po)

        if spec.skip_non_finite:
            # A sum of squares is finite iff every entry is (short of overflowing the range).
            ok = jnp.isfinite(objective + jnp.sum(sq_w) + jnp.sum(sq_b))
            params, opt_state = jax.lax.cond(ok, apply, lambda po: po,
                                             (state.params, state.opt_state))
        else:  # DP: whether a step happens must not depend on the data
            ok = jnp.asarray(True)
            params, opt_state = apply((state.params, state.opt_state))
        kept = lambda v: jnp.where(ok, v, jnp.zeros_like(v))  # noqa: E731
        stats = EpochStats(kept(objective), kept(examples).astype(jnp.int32),
                           kept(jnp.sqrt(sq_w)).astype(dt), kept(delta_sum).astype(dt),
                           ok.astype(jnp.int32), (~ok).astype(jnp.int32))
        return TrainState(params, opt_state, key), stats

    def epoch(state: TrainState, idx, mask, x, y):
        if spec.mode == "pmap":  # this device's columns of every global batch
            cols = spec.batch // spec.devices
            start = jax.lax.axis_index(parallel_lib.DATA_AXIS) * cols
            take = lambda v: jax.lax.dynamic_slice_in_dim(v, start, cols, axis=1)  # noqa: E731
            idx, mask_local = take(idx), (None if mask is None else take(mask))
        else:
            mask_local = mask
        if spec.denominator is not None:  # Poisson: the expected batch size
            real = jnp.full((idx.shape[0],), spec.denominator, x.dtype)
        elif mask is None:
            real = jnp.full((idx.shape[0],), spec.batch, x.dtype)
        else:  # the real rows of each (global) step
            real = jnp.sum(mask, axis=1).astype(x.dtype)

        def body(state, s):
            rows, m, denom = s
            return step(state, x[rows], y[rows], m, denom)

        state, per_step = jax.lax.scan(body, state, (idx, mask_local, real))
        stats = jax.tree_util.tree_map(lambda v: jnp.sum(v, axis=0), per_step)
        if spec.mode == "sharding":  # hand back replicated results (readable on every process)
            state, stats = jax.lax.with_sharding_constraint(
                (state, stats), parallel_lib.replicated_sharding(spec.mesh))
        return state, stats

    return epoch


@functools.partial(jax.jit, static_argnames=("spec",))
def _epoch_jit(state, idx, mask, x, y, *, spec: StepSpec):
    return make_epoch(spec)(state, idx, mask, x, y)


class _PmapEpoch:
    """pmap's compiled epoch: inputs copied to every local device, outputs read from the first."""

    def __init__(self, spec: StepSpec, devices, args):
        self._n = len(devices)
        self._first = devices[0]
        fn = jax.pmap(make_epoch(spec), axis_name=parallel_lib.DATA_AXIS, devices=devices)
        self._exe = fn.lower(*self._stack(args)).compile()

    def _stack(self, args):
        return jax.tree_util.tree_map(
            lambda v: jnp.broadcast_to(v, (self._n,) + jnp.shape(v)), args)

    def __call__(self, *args):
        stacked = jax.device_put(self._stack(args), self._exe.input_shardings[0])
        out = self._exe(*stacked)
        return jax.tree_util.tree_map(lambda v: jax.device_put(v[0], self._first), out)


def compile_epoch(spec: StepSpec, args, local_devices=None):
    """The epoch compiled ahead of time for ``args = (state, idx, mask, x, y)``.

    Single device and sharding: one ``jit`` (cached by JAX per :class:`StepSpec`); pmap: over
    ``local_devices``. Returns a callable with the same arguments as :func:`make_epoch`'s.
    """
    if spec.mode == "pmap":
        return _PmapEpoch(spec, local_devices, args)
    return _epoch_jit.lower(*args, spec=spec).compile()
