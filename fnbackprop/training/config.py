"""The settings of a training run: :class:`TrainConfig`, per-dataset defaults, validation."""

from __future__ import annotations

import dataclasses
import math
import os
from types import MappingProxyType

import numpy as np

from fnbackprop import data as data_lib
from fnbackprop.activations import HIDDEN_ACTIVATIONS
from fnbackprop.network import INIT_SCHEMES

__all__ = [
    "TrainConfig",
    "default_config",
    "make_config",
    "OPTIMIZERS",
    "SCHEDULES",
    "GRADIENTS",
    "DTYPES",
    "TASKS",
    "SAMPLINGS",
    "ACCOUNTANTS",
    "DATASET_DEFAULTS",
    "GENERIC_DEFAULTS",
    "DEFAULTED_FIELDS",
    "SAVING_FIELDS",
    "MOMENTUM",
    "TEST_SPLIT_SEED",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "exponential", "step")
GRADIENTS: tuple[str, ...] = ("manual", "autodiff")
DTYPES: tuple[str, ...] = ("float32", "float64")
TASKS: tuple[str, ...] = ("classification", "regression")
SAMPLINGS: tuple[str, ...] = ("poisson", "shuffle")
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
MOMENTUM = 0.9
"""Momentum of the ``momentum`` and ``nesterov`` optimisers."""
TEST_SPLIT_SEED = 0
"""Seed of the train/test split of a user's own file: fixed, so that runs with different
``seed`` values are evaluated on the same test set (bundled datasets have fixed splits anyway)."""

DEFAULTED_FIELDS: tuple[str, ...] = (
    "hidden", "activation", "init", "optimizer", "lr", "batch_size", "epochs",
)
"""The :class:`TrainConfig` fields whose ``None`` means "the dataset's default"."""

SAVING_FIELDS: tuple[str, ...] = ("checkpoint_every", "checkpoint_seconds", "keep_checkpoints")
"""The fields that say how a run is saved, not what it computes: a resumed run may change them."""

GENERIC_DEFAULTS = MappingProxyType(dict(
    hidden=(64, 64), activation="relu", init="he_normal", optimizer="adam", lr=1e-3,
    batch_size=32, epochs=50,
))
"""The defaults of a user's ``.npz``/``.csv`` file."""

DATASET_DEFAULTS: MappingProxyType = MappingProxyType({
    "digits": MappingProxyType(dict(
        hidden=(2048,), activation="relu", init="he_normal", optimizer="adam", lr=1e-3,
        batch_size=32, epochs=60, dropout=0.5,
    )),
    "breast_cancer": MappingProxyType(dict(
        hidden=(32,), activation="relu", init="he_normal", optimizer="adam", lr=1e-3,
        batch_size=32, epochs=30,
    )),
    "diabetes": MappingProxyType(dict(
        hidden=(32,), activation="tanh", init="xavier_normal", optimizer="adam", lr=1e-3,
        batch_size=32, epochs=30,
    )),
    "mnist1d": MappingProxyType(dict(
        conv=((32, 5, 1), (32, 5, 2), (32, 5, 2)), hidden=(), activation="gelu",
        init="he_normal", optimizer="adam", lr=1e-2, schedule="cosine", batch_size=100,
        epochs=150, augment=True,
    )),
    "mnist1d_60k": MappingProxyType(dict(
        conv=((25, 5, 1), (25, 5, 2), (25, 5, 2)), hidden=(), activation="relu",
        init="he_normal", optimizer="adam", lr=2e-3, schedule="cosine", batch_size=100,
        epochs=20, augment=True,
    )),
    "xor": MappingProxyType(dict(
        hidden=(16, 16), activation="tanh", init="xavier_normal", optimizer="adam", lr=1e-2,
        batch_size=32, epochs=30,
    )),
    "spirals": MappingProxyType(dict(
        hidden=(64, 64), activation="relu", init="he_normal", optimizer="adam", lr=3e-3,
        batch_size=32, epochs=60,
    )),
})
"""Per bundled dataset: its recommended settings (what each reaches: README's table).

:func:`default_config` (and ``train(dataset=NAME)``, and ``fnbackprop train --dataset NAME``)
applies all of them, including regularisation (dropout for digits, augmentation for mnist1d). A
:class:`TrainConfig` built by hand keeps its own values and takes from here only the fields it
leaves ``None`` (architecture, optimiser, lr, batch size, epochs). A user's file gets
:data:`GENERIC_DEFAULTS`.
"""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (``summary.json``'s ``config`` is ``dataclasses.asdict``).

    Fields left ``None`` take the dataset's default (:data:`DATASET_DEFAULTS`); start from
    :func:`default_config` to get all of a dataset's recommended settings (some include
    regularisation). Values are checked when the config is built: a bad one raises
    ``ValueError`` naming the field, the value and what is allowed.

    Attributes:
      dataset: a bundled name (:data:`fnbackprop.data.DATASETS`) or a path to a ``.npz``
        (arrays ``x``, ``y``) or ``.csv`` file.
      target: ``.csv`` target column name (default: the last column).
      task: ``"classification"`` or ``"regression"`` for a user's file (``None``: guessed from
        the targets, see :func:`fnbackprop.load_dataset`).
      conv: 1-D convolution layers ``((channels, kernel, stride), ...)`` before the dense
        layers (SAME padding, the hidden activation; :class:`fnbackprop.Conv1D`), for data whose
        examples have a signal shape (``(length,)`` or ``(length, channels)``). ``None``: the
        dataset's default when ``hidden`` is left ``None`` too, else none (a given dense
        architecture is the whole architecture); ``()``: none.
      hidden: dense hidden-layer widths, e.g. ``(64, 64)``; ``()`` for none.
      activation: hidden activation, one of :data:`fnbackprop.HIDDEN_ACTIVATIONS`.
      init: initialisation scheme, one of :data:`fnbackprop.INIT_SCHEMES`.
      optimizer: one of :data:`OPTIMIZERS`.
      lr: learning rate > 0 (the peak value of a schedule).
      schedule: one of :data:`SCHEDULES`.
      batch_size: an integer ≥ 1 or ``"full"``.
      epochs: passes over the training set, ≥ 1.
      l1, l2: weight-penalty strengths ≥ 0 (``l1 Σ|w| + (l2/2) Σ w²``; biases not penalised).
      dropout: inverted-dropout rate of the hidden layers, in [0, 1).
      clip_norm: clip the batch gradient to this global norm (``optax.clip_by_global_norm``).
      clip_value: clip every gradient entry to ±this (``optax.clip``).
      per_example_clip: clip every example's gradient to this norm
        (:func:`fnbackprop.clipped_grad`).
      noise_multiplier: DP-SGD noise σ ≥ 0 (needs ``per_example_clip``): Gaussian noise of
        standard deviation σ·C on the sum of the clipped per-example gradients.
      target_epsilon: instead of ``noise_multiplier``: the smallest σ whose ε (after every
        epoch, with ``accountant``) is at most this (needs ``per_example_clip``).
      delta: the δ of the (ε, δ) guarantee; ``None``: :func:`fnbackprop.privacy.default_delta`
        of the training-set size.
      accountant: ``"pld"`` or ``"rdp"`` (:mod:`fnbackprop.privacy`).
      sampling: ``"poisson"`` (every step includes each example independently with probability
        B/N: the sampling the accountants price) or ``"shuffle"`` (every example once per
        epoch); ``None``: Poisson when there is noise, else shuffle.
      physical_batch_size: with ``per_example_clip``: process each batch in chunks of this many
        rows (the clipped sums accumulated, noise drawn once), for batches too large for memory.
      train_metrics: compute metrics from the training data (per-epoch training loss and
        accuracy, gradient and δ norms, the first-batch gradient check); ``None``: on, except
        with noise, where they fall outside the privacy guarantee.
      early_stopping: patience in epochs (needs ``val_fraction > 0``); ``None``: off.
      val_fraction: fraction of the training set held out for validation when early stopping.
      augment: perturb each training batch (:func:`fnbackprop.training.augmentation.augment`).
      gradient: ``"manual"`` (hand-derived δ recursion) or ``"autodiff"`` (``jax.grad``).
      seed: integer in [0, 2³²): initialisation, shuffling, dropout, augmentation, validation
        split.
      checkpoint_every: save a checkpoint every this many epochs (and after the last); 0:
        never; ``None`` (default): bounded by wall time, at most one save every
        ``checkpoint_seconds``, plus the last epoch and an interrupted one (SIGINT/SIGTERM).
      checkpoint_seconds: the wall-time bound of ``checkpoint_every=None``, > 0.
      keep_checkpoints: how many checkpoints to keep, ≥ 1.
      dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
    """

    dataset: str = "digits"
    target: str | None = None
    task: str | None = None
    conv: tuple[tuple[int, int, int], ...] | None = None
    hidden: tuple[int, ...] | None = None
    activation: str | None = None
    init: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str = "constant"
    batch_size: int | str | None = None
    epochs: int | None = None
    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    clip_norm: float | None = None
    clip_value: float | None = None
    per_example_clip: float | None = None
    noise_multiplier: float = 0.0
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "pld"
    sampling: str | None = None
    physical_batch_size: int | None = None
    train_metrics: bool | None = None
    early_stopping: int | None = None
    val_fraction: float = 0.1
    augment: bool = False
    gradient: str = "manual"
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_seconds: float = 60.0
    keep_checkpoints: int = 3
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden is not None and not isinstance(self.hidden, str):
            try:
                object.__setattr__(self, "hidden", tuple(self.hidden))
            except TypeError:
                pass
        if self.conv is not None and not isinstance(self.conv, str):
            try:
                object.__setattr__(self, "conv", tuple(
                    tuple(c) if isinstance(c, (list, tuple)) else c for c in self.conv))
            except TypeError:
                pass
        _validate(self)

    def to_dict(self) -> dict:
        """The JSON form (``summary.json``'s ``config``): tuples become lists."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(d["hidden"]) if d["hidden"] is not None else None
        d["conv"] = [list(c) for c in d["conv"]] if d["conv"] is not None else None
        return d

    @property
    def private(self) -> bool:
        """Whether the run adds DP noise (``noise_multiplier > 0`` or a ``target_epsilon``)."""
        return self.noise_multiplier > 0 or self.target_epsilon is not None

    @property
    def poisson(self) -> bool:
        """Whether batches are Poisson samples (see ``sampling``)."""
        return self.sampling == "poisson" or (self.sampling is None and self.private)

    @property
    def logs_training_data(self) -> bool:
        """Whether the run reports metrics computed from the training data."""
        return self.train_metrics if self.train_metrics is not None else not self.private


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_)))


def _looks_like_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in (".npz", ".csv")


def _bad(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"{field} must be {allowed}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...], optional: bool) -> None:
    if (value is None and optional) or value in allowed:
        return
    raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _validate(c: TrainConfig) -> None:
    """Raises ``ValueError`` naming the first bad field of ``c``."""
    _validate_data(c)
    if c.hidden is not None:
        if not isinstance(c.hidden, tuple) or not all(_is_int(h) and h >= 1 for h in c.hidden):
            raise _bad("hidden", c.hidden, "a tuple of integers ≥ 1 (e.g. (64, 64)) or None")
    if c.conv is not None and not (isinstance(c.conv, tuple) and all(
            isinstance(l, tuple) and len(l) == 3 and all(_is_int(v) and v >= 1 for v in l)
            for l in c.conv)):
        raise _bad("conv", c.conv, "a tuple of (channels, kernel, stride) triples of integers "
                   "≥ 1 (e.g. ((25, 5, 1), (25, 5, 2))), () or None")
    for name, allowed, optional in (
        ("activation", HIDDEN_ACTIVATIONS, True), ("init", INIT_SCHEMES, True),
        ("optimizer", OPTIMIZERS, True), ("schedule", SCHEDULES, False),
        ("gradient", GRADIENTS, False), ("dtype", DTYPES, False),
    ):
        _check_choice(name, getattr(c, name), allowed, optional)
    if c.lr is not None and not (_is_num(c.lr) and math.isfinite(c.lr) and c.lr > 0):
        raise _bad("lr", c.lr, "a finite number > 0")
    if c.batch_size is not None and c.batch_size != "full" and not (
        _is_int(c.batch_size) and c.batch_size >= 1
    ):
        raise _bad("batch_size", c.batch_size, "an integer ≥ 1 or 'full'")
    if c.epochs is not None and not (_is_int(c.epochs) and c.epochs >= 1):
        raise _bad("epochs", c.epochs, "an integer ≥ 1")
    _validate_regularisation(c)
    _validate_run(c)


def _validate_data(c: TrainConfig) -> None:
    if not isinstance(c.dataset, str) or not c.dataset:
        raise _bad("dataset", c.dataset, "a dataset name or a .npz/.csv path")
    if c.dataset not in data_lib.DATASETS and not _looks_like_file(c.dataset):
        raise ValueError(
            f"unknown dataset {c.dataset!r}; choose one of {', '.join(data_lib.DATASETS)} or "
            "give a path to a .npz (arrays x, y) or .csv file"
        )
    if c.target is not None:
        if not isinstance(c.target, str) or not c.target:
            raise _bad("target", c.target, "a .csv column name or None")
        if not c.dataset.lower().endswith(".csv"):
            raise ValueError(
                f"target={c.target!r} only applies to a .csv dataset, not {c.dataset!r}")
    _check_choice("task", c.task, TASKS, optional=True)
    if c.task is not None and c.dataset in data_lib.DATASETS:
        raise ValueError(f"task={c.task!r} only applies to a .npz/.csv file; the bundled "
                         f"{c.dataset!r} has a fixed task")


def _validate_regularisation(c: TrainConfig) -> None:
    for name in ("l1", "l2", "noise_multiplier"):
        v = getattr(c, name)
        if not (_is_num(v) and math.isfinite(v) and v >= 0):
            raise _bad(name, v, "a finite number ≥ 0")
    if not (_is_num(c.dropout) and 0.0 <= c.dropout < 1.0):
        raise _bad("dropout", c.dropout, "a number in [0, 1)")
    for name in ("clip_norm", "clip_value", "per_example_clip"):
        v = getattr(c, name)
        if v is not None and not (_is_num(v) and math.isfinite(v) and v > 0):
            raise _bad(name, v, "a finite number > 0 or None")
    if c.noise_multiplier > 0 and c.per_example_clip is None:
        raise ValueError(
            f"noise_multiplier={c.noise_multiplier} needs per_example_clip (the noise is scaled "
            "by the clipping norm)"
        )
    _validate_privacy(c)
    if c.per_example_clip is not None:
        if c.dropout > 0:
            raise ValueError(
                "per_example_clip does not support dropout (fb.clipped_grad clips the gradients of "
                "the data loss without dropout); use dropout=0"
            )
        if c.gradient != "manual":
            raise ValueError(
                "per_example_clip computes fb.clipped_grad from the hand-derived backward pass; "
                "gradient='autodiff' does not apply"
            )
    if c.early_stopping is not None and not (_is_int(c.early_stopping) and c.early_stopping >= 1):
        raise _bad("early_stopping", c.early_stopping, "a patience (integer ≥ 1) or None")
    if not (_is_num(c.val_fraction) and 0.0 <= c.val_fraction < 1.0):
        raise _bad("val_fraction", c.val_fraction, "a number in [0, 1)")
    if c.early_stopping is not None and c.val_fraction == 0:
        raise ValueError("early_stopping needs a validation split: val_fraction must be > 0")
    if not isinstance(c.augment, (bool, np.bool_)):
        raise _bad("augment", c.augment, "True or False")


def _validate_privacy(c: TrainConfig) -> None:
    if c.target_epsilon is not None:
        if not (_is_num(c.target_epsilon) and math.isfinite(c.target_epsilon)
                and c.target_epsilon > 0):
            raise _bad("target_epsilon", c.target_epsilon, "a finite number > 0 or None")
        if c.noise_multiplier > 0:
            raise ValueError(f"target_epsilon={c.target_epsilon} chooses the noise multiplier "
                             f"itself; leave noise_multiplier at 0 (got {c.noise_multiplier})")
        if c.per_example_clip is None:
            raise ValueError(f"target_epsilon={c.target_epsilon} needs per_example_clip (the "
                             "noise is scaled by the clipping norm)")
    if c.delta is not None and not (_is_num(c.delta) and 0 < c.delta < 1):
        raise _bad("delta", c.delta, "a number in (0, 1) or None")
    _check_choice("accountant", c.accountant, ACCOUNTANTS, optional=False)
    _check_choice("sampling", c.sampling, SAMPLINGS, optional=True)
    if c.physical_batch_size is not None:
        if not (_is_int(c.physical_batch_size) and c.physical_batch_size >= 1):
            raise _bad("physical_batch_size", c.physical_batch_size, "an integer ≥ 1 or None")
        if c.per_example_clip is None:
            raise ValueError("physical_batch_size splits the per-example clipped step; it needs "
                             "per_example_clip")
    if c.train_metrics is not None and not isinstance(c.train_metrics, (bool, np.bool_)):
        raise _bad("train_metrics", c.train_metrics, "True, False or None")
    if c.target_epsilon is not None and c.sampling == "shuffle":
        raise ValueError("target_epsilon calibrates σ for Poisson sampling (the sampling the "
                         "accountants price); with sampling='shuffle' give noise_multiplier")
    if c.poisson and c.batch_size == "full":
        raise ValueError("Poisson sampling needs an expected batch size, not batch_size='full'")


def _validate_run(c: TrainConfig) -> None:
    if not (_is_int(c.seed) and 0 <= c.seed < 2**32):
        raise _bad("seed", c.seed, "an integer in [0, 2**32)")
    if c.checkpoint_every is not None and not (_is_int(c.checkpoint_every)
                                               and c.checkpoint_every >= 0):
        raise _bad("checkpoint_every", c.checkpoint_every,
                   "an integer ≥ 0 (0: no checkpoints) or None (bounded by wall time)")
    if not (_is_num(c.checkpoint_seconds) and math.isfinite(c.checkpoint_seconds)
            and c.checkpoint_seconds > 0):
        raise _bad("checkpoint_seconds", c.checkpoint_seconds, "a finite number of seconds > 0")
    if not (_is_int(c.keep_checkpoints) and c.keep_checkpoints >= 1):
        raise _bad("keep_checkpoints", c.keep_checkpoints, "an integer ≥ 1")


def default_config(dataset: str) -> TrainConfig:
    """The dataset's recommended configuration: every field of :data:`DATASET_DEFAULTS` applied.

    Args:
      dataset: a bundled name (see :data:`DATASET_DEFAULTS`) or a ``.npz``/``.csv`` path
        (generic defaults).

    Raises:
      ValueError: an unknown dataset name.
    """
    base = TrainConfig(dataset=dataset)  # validates the name
    return dataclasses.replace(base, **DATASET_DEFAULTS.get(dataset, GENERIC_DEFAULTS))


def fill_defaults(c: TrainConfig) -> TrainConfig:
    """Fills the ``None`` fields of ``c`` (only those) from its dataset's defaults; ``conv``
    only when ``hidden`` was left ``None`` as well (else it is ``()``)."""
    defaults = DATASET_DEFAULTS.get(c.dataset, GENERIC_DEFAULTS)
    fill = {k: defaults[k] for k in DEFAULTED_FIELDS if getattr(c, k) is None}
    if c.conv is None:
        fill["conv"] = defaults.get("conv", ()) if c.hidden is None else ()
    return dataclasses.replace(c, **fill) if fill else c


def make_config(config: TrainConfig | None, overrides: dict, data=None) -> TrainConfig:
    """``config`` (default: the dataset's :func:`default_config`) with ``overrides`` applied and
    its ``None`` fields filled; ``data`` (a :class:`fnbackprop.Dataset`) names the dataset.

    Raises:
      ValueError: ``config`` is not a :class:`TrainConfig`, an unknown field, a bad value.
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    if data is not None:
        if not isinstance(data, data_lib.Dataset):
            raise ValueError(f"data must be a fnbackprop.data.Dataset, got {type(data).__name__}")
        overrides = {**overrides, "dataset": data.name}
    if config is None:
        config = default_config(overrides.get("dataset", TrainConfig.dataset))
        if "hidden" in overrides and "conv" not in overrides:
            overrides = {**overrides, "conv": ()}  # a dense architecture given in full
    return fill_defaults(dataclasses.replace(config, **overrides))
