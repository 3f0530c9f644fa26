"""Everything a run needs before its first epoch: data, network, devices, initial state.

:func:`prepare` standardises the data with training statistics (after carving the
early-stopping validation split), builds the network, resolves the devices and the data-parallel
mode, and derives the :class:`~fnbackprop.training.step.StepSpec` of the compiled epoch.
:func:`check_first_batch` runs the gradient check on exactly the first batch a run trains on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop import data as data_lib
from fnbackprop import parallel as parallel_lib
from fnbackprop.backprop import manual_grad
from fnbackprop.gradcheck import GradCheckReport, check_gradients
from fnbackprop.layers import Conv1D, Dense, Flatten
from fnbackprop.network import MLP, Network, init
from fnbackprop.training import memory
from fnbackprop.training.config import TEST_SPLIT_SEED, TrainConfig, make_config
from fnbackprop.training import accounting
from fnbackprop.training.accounting import PrivacyPlan
from fnbackprop.training.sampling import Batching, batching, epoch_batches
from fnbackprop.training.step import OptimizerSpec, StepSpec, TrainState, make_optimizer

__all__ = ["Prepared", "DeviceData", "prepare", "device_data", "initial_state", "run_keys",
           "resolve_devices",
           "load_data", "check_first_batch", "check_x64"]


class Prepared(NamedTuple):
    """A run's data, network and compiled-epoch settings, ready for the epochs.

    Attributes:
      config: the configuration (defaults filled).
      data: the standardised dataset (validation rows removed when early stopping).
      val: the standardised ``(x_val, y_val)`` or ``None``.
      net: the network.
      dtype: the floating dtype.
      batching: how the run batches its examples.
      spec: the :class:`~fnbackprop.training.step.StepSpec` of the compiled epoch.
      privacy: the :class:`~fnbackprop.training.accounting.PrivacyPlan` of a run with DP noise.
      devices: the devices of the run.
    """

    config: TrainConfig
    data: Any
    val: tuple[np.ndarray, np.ndarray] | None
    net: Any
    dtype: Any
    batching: Batching
    spec: StepSpec
    privacy: PrivacyPlan | None
    devices: list

    @property
    def batch(self) -> int:
        """The batch size (Poisson: the expected one)."""
        return self.batching.batch

    @property
    def steps_per_epoch(self) -> int:
        return self.batching.steps

    @property
    def task(self) -> str:
        return self.data.task


def check_x64(config: TrainConfig) -> None:
    """Raises ``ValueError`` when ``config`` asks for float64 and JAX runs in 32 bits."""
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
            "before any JAX work (the command line does this for --dtype float64)"
        )


def load_data(config: TrainConfig):
    """The run's raw dataset (:func:`fnbackprop.load_dataset` with the fixed test split)."""
    return data_lib.load_dataset(config.dataset, seed=TEST_SPLIT_SEED, target=config.target,
                                 task=config.task)


def resolve_devices(devices, parallel: str) -> list:
    """The devices of a run (see :func:`fnbackprop.train`'s ``devices``), validated."""
    if parallel not in parallel_lib.PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {parallel!r}; allowed: "
                         f"{', '.join(parallel_lib.PARALLEL_MODES)}")
    everything = jax.devices()
    if devices is None:
        return everything[:1] if jax.process_count() == 1 else everything
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices must be 'all', an int, a list of devices or a Mesh, "
                             f"got {devices!r}")
        return list(everything)
    if isinstance(devices, jax.sharding.Mesh):
        if devices.devices.ndim != 1:
            raise ValueError(f"the mesh must have one (data) axis, got axes {devices.axis_names}")
        return list(devices.devices.flat)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(everything):
            raise ValueError(f"devices={devices} but {len(everything)} device(s) are available")
        return list(everything[:devices])
    devices = list(devices)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError("devices must be a non-empty list of distinct devices")
    return devices


def build_network(config: TrainConfig, ds):
    """The network of a run: ``config``'s convolutions and dense hidden layers, then the
    dataset's head (softmax + cross-entropy, or identity + MSE for regression).

    Without convolutions it is an :class:`fnbackprop.MLP`. With them the examples are read as
    signals of shape ``(length, channels)``: ``(length, 1)`` for a one-axis ``image_shape``
    (mnist1d), the ``image_shape`` itself for a two-axis one.

    Raises:
      ValueError: convolutions for data without a signal shape.
    """
    output, loss = ("softmax", "cross_entropy") if ds.task == "classification" \
        else ("identity", "mse")
    if not config.conv:
        return MLP((ds.num_features, *config.hidden, ds.num_outputs), config.activation,
                   output, loss)
    shape = ds.image_shape
    if shape is None or len(shape) > 2:
        raise ValueError(f"conv layers need examples with a signal shape (length,) or (length, "
                         f"channels), such as mnist1d; {ds.name} has "
                         f"{'flat (tabular) examples' if shape is None else f'shape {shape}'}")
    layers = [Conv1D(c, k, stride=s, padding="SAME", activation=config.activation)
              for c, k, s in config.conv]
    layers += [Flatten()] + [Dense(h, config.activation) for h in config.hidden]
    return Network(tuple(shape) if len(shape) == 2 else (shape[0], 1),
                   (*layers, Dense(ds.num_outputs, output)), loss)


def prepare(config: TrainConfig, ds, devices: list, parallel: str = "sharding") -> Prepared:
    """Data, network, devices and the step spec of a run (see the module docstring).

    Raises:
      ValueError: a setting that does not fit the data or the devices (e.g. a pmap batch the
        device count does not divide, or a network too large for the device's memory).
    """
    if config.early_stopping is not None:
        ds, val = data_lib.split_validation(ds, config.val_fraction, config.seed)
    else:
        val = None
    ds, val, _ = data_lib.standardize(ds, val)
    net = build_network(config, ds)
    n = int(ds.x_train.shape[0])
    mode = "single" if len(devices) == 1 else ("sharding" if parallel == "sharding" else "pmap")
    d = len(devices) if mode == "pmap" else 1
    plan = batching(n, config.batch_size, poisson=config.poisson, epochs=config.epochs,
                    multiple=d * (config.physical_batch_size or 1))
    if mode == "pmap" and not plan.poisson:
        parallel_lib.check_divisible(plan.batch, d)
    _check_memory(config, net, ds, val, plan.rows, devices)
    privacy = accounting.plan(config, plan) if config.private else None
    spec = StepSpec(
        net=net, optimizer=OptimizerSpec(
            config.optimizer, float(config.lr), config.schedule,
            config.epochs * plan.steps if config.schedule != "constant" else 0,
            config.clip_norm, config.clip_value),
        l1=float(config.l1), l2=float(config.l2), dropout=float(config.dropout),
        per_example_clip=config.per_example_clip,
        noise_multiplier=privacy.noise_multiplier if privacy else 0.0,
        gradient=config.gradient, augment=ds.augment_kind if config.augment else "none",
        image_shape=ds.image_shape if config.augment else None,
        batch=plan.rows, masked=plan.masked,
        denominator=float(plan.batch) if plan.poisson else None,
        physical_batch=config.physical_batch_size, skip_non_finite=not config.private,
        diagnostics=config.logs_training_data, mode=mode, devices=d,
        mesh=parallel_lib.data_mesh(devices) if mode == "sharding" else None)
    return Prepared(config, ds, val, net, jnp.dtype(config.dtype), plan, spec, privacy,
                    list(devices))


def _check_memory(config, net, ds, val, rows: int, devices) -> None:
    sets = (int(ds.x_train.shape[0]), 0 if val is None else len(val[0]), int(ds.x_test.shape[0]))
    memory.check_fits(memory.estimate(
        net, jnp.dtype(config.dtype), batch=-(-rows // len(devices)), optimizer=config.optimizer,
        set_rows=sets, features=ds.num_features),
        next(d for d in devices if d.process_index == jax.process_index()))


@jax.jit
def _split_seed(seed):
    return tuple(jax.random.split(jax.random.key(seed), 3))


def run_keys(seed: int):
    """``(k_init, k_reserved, k_steps)``: initialisation, (unused), the per-step keys."""
    return _split_seed(np.uint32(seed))


_init_jit = jax.jit(init, static_argnums=(1, 2, 3))
""":func:`fnbackprop.init` compiled as one program (op by op it compiles every random op)."""


def initial_state(prep: Prepared) -> TrainState:
    """The parameters, optimizer state and step key a run starts from (a function of the seed)."""
    k_init, _, k_steps = run_keys(prep.config.seed)
    params = _init_jit(k_init, prep.net, prep.config.init, prep.dtype)
    opt_state = jax.jit(make_optimizer(prep.spec.optimizer).init)(params)
    # Strong (non-weak) types, so a restored state has exactly the compiled signature.
    strong = lambda a: jnp.asarray(np.asarray(a))  # noqa: E731
    return TrainState(params, jax.tree_util.tree_map(strong, opt_state), k_steps)


def check_first_batch(config: TrainConfig | None = None, *, data=None, max_fd_per_param: int = 16,
                      float64: bool = True, **overrides) -> GradCheckReport:
    """Gradient check (:func:`fnbackprop.check_gradients`) of the first batch a run trains on.

    The run's initial parameters and the first batch of its first epoch (before augmentation),
    with its ``l1``, ``l2`` and the dropout mask of its first step. With ``float64`` (default)
    parameters and batch are cast to float64 for the check (inside ``jax.enable_x64``):
    float32 finite differences are too noisy to check wide layers at a useful tolerance.

    Returns:
      The :class:`fnbackprop.GradCheckReport`.
    """
    config = make_config(config, overrides, data)
    check_x64(config)
    prep = prepare(config, data if data is not None else load_data(config), jax.devices()[:1])
    params = initial_state(prep).params
    first = epoch_batches(prep.batching, config.seed, 0)
    rows = first.idx[0] if first.mask is None else first.idx[0][first.mask[0]]
    x, y = np.asarray(prep.data.x_train)[rows], np.asarray(prep.data.y_train)[rows]
    x = x.reshape((len(rows), *prep.net.input_shape))
    # The first step's dropout key, as the step derives it (fnbackprop.training.step).
    k_step = jax.random.split(run_keys(config.seed)[2])[1]
    k_grad = jax.random.split(k_step)[1]
    key = jax.random.split(k_grad)[0] if config.dropout > 0 else None
    kw = dict(l1=config.l1, l2=config.l2, dropout=config.dropout, key=key)

    def check(dtype):
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        xb = jnp.asarray(x, dtype)
        yb = jnp.asarray(y, dtype) if prep.task == "regression" else jnp.asarray(y)
        # One compiled call instead of op-by-op dispatch of the hand-derived gradient.
        manual = jax.jit(lambda p_, x_, y_: manual_grad(prep.net, p_, x_, y_, **kw))
        return check_gradients(prep.net, p, xb, yb, **kw, max_fd_per_param=max_fd_per_param,
                               grad_fn=lambda net_, p_, x_, y_, **_: manual(p_, x_, y_))

    if float64:
        with jax.enable_x64(True):
            return check(jnp.float64)
    return check(prep.dtype)


class DeviceData(NamedTuple):
    """The run's arrays on its devices (replicated on the mesh under sharding).

    Attributes:
      x, y: the training set (inputs in the dtype of the run; labels int32 or targets).
      names: ``("train", ["val",] "test")``.
      sets: the ``(x, y)`` pair of each name, for evaluation.
    """

    x: jax.Array
    y: jax.Array
    names: tuple[str, ...]
    sets: tuple[tuple[jax.Array, jax.Array], ...]


def device_data(prep: Prepared) -> DeviceData:
    """Puts the training, validation and test sets on the run's devices (the training set is
    evaluated only when the run logs metrics of the training data)."""
    y_dtype = prep.dtype if prep.task == "regression" else jnp.int32
    pairs = [("train", prep.data.x_train, prep.data.y_train)]
    if prep.val is not None:
        pairs.append(("val", *prep.val))
    pairs.append(("test", prep.data.x_test, prep.data.y_test))
    arrays = tuple((jnp.asarray(np.asarray(x), prep.dtype), jnp.asarray(np.asarray(y), y_dtype))
                   for _, x, y in pairs)
    if prep.spec.mode == "sharding":
        arrays = parallel_lib.replicate(prep.spec.mesh, arrays)
    first = 0 if prep.config.logs_training_data else 1
    return DeviceData(*arrays[0], tuple(name for name, _, _ in pairs[first:]), arrays[first:])
