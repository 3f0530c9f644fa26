"""Training a network on real data: full batch, SGD and mini-batch, on device.

``fb.train(...)`` and ``fnbackprop train`` load a dataset, standardise it with training
statistics, and train with the hand-derived gradient (or ``jax.grad``, or per-example clipping)
and an optax optimiser. One job per module:

* :mod:`~fnbackprop.training.config`: :class:`TrainConfig`, per-dataset defaults, validation;
* :mod:`~fnbackprop.training.prepare`: data, network, devices, initial state, first-batch check;
* :mod:`~fnbackprop.training.sampling`: which examples each step uses;
* :mod:`~fnbackprop.training.augmentation`: on-device augmentation inside the step;
* :mod:`~fnbackprop.training.step`: the train state, the optimiser, the step, the compiled epoch;
* :mod:`~fnbackprop.training.evaluation`: loss and accuracy or R² on whole sets;
* :mod:`~fnbackprop.training.loop`: the run's typed state and the loop (prepare → restore →
  epochs → finish);
* :mod:`~fnbackprop.training.checkpoint`: orbax checkpoints of the run state;
* :mod:`~fnbackprop.training.outputs`: metrics, summary, hashes, atomic files.

Regimes: ``batch_size="full"`` is full-batch gradient descent (data in their stored order),
``1`` SGD, ``N`` mini-batches of N. Every epoch visits every example exactly once, in an order
drawn from ``(seed, epoch)``; when N does not divide the training set, the last step holds the
remainder (padded to the batch shape with masked rows), and every step's loss is the mean over
its own examples. A whole epoch is one compiled ``lax.scan``, compiled ahead of time so that
``compile_time_s`` and ``train_time_s`` are measured apart.

Non-finite steps: a step whose objective or gradient is not finite is skipped (parameters and
optimizer state kept) and counted in ``skipped_steps``; an epoch that ends with a non-finite
training loss, or skipped every step, stops the run as *diverged*, keeping the last good (or
best) parameters.

Metrics per epoch (``metrics.jsonl``, :attr:`TrainResult.history`): ``train_loss`` /
``train_accuracy`` (or ``train_r2``) of the parameters at the end of the epoch on the whole
training set (data loss: no penalty, dropout or augmentation), ``val_*`` (early stopping) and
``test_*`` likewise; ``train_batch_loss``: the mean of the objective the steps descended;
``grad_norm``: per layer, ``‖∂L/∂W^l‖_F`` averaged over the steps; ``delta_norm``: per layer,
``‖δ_i^l‖`` averaged over the examples (:mod:`fnbackprop.diagnostics`); ``skipped_steps``,
``steps``, ``lr`` (at the epoch's first step), ``epoch_time_s``.
"""

from fnbackprop.training.checkpoint import CheckpointError
from fnbackprop.training.config import (
    DATASET_DEFAULTS,
    DTYPES,
    GRADIENTS,
    OPTIMIZERS,
    SCHEDULES,
    TASKS,
    TEST_SPLIT_SEED,
    TrainConfig,
    default_config,
)
from fnbackprop.training.loop import Interrupted, RunState, TrainResult, check_resume, train
from fnbackprop.training.outputs import params_sha256
from fnbackprop.training.prepare import check_first_batch
from fnbackprop.training.sampling import epoch_permutation
from fnbackprop.training.step import TrainState

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "RunState",
    "Interrupted",
    "CheckpointError",
    "default_config",
    "train",
    "check_first_batch",
    "check_resume",
    "epoch_permutation",
    "params_sha256",
    "OPTIMIZERS",
    "SCHEDULES",
    "GRADIENTS",
    "DTYPES",
    "TASKS",
    "DATASET_DEFAULTS",
    "TEST_SPLIT_SEED",
]
