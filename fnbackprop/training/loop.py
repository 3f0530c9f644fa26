"""The training loop: prepare → restore → epochs → finish, with the run's state typed and whole.

Every epoch maps one :class:`RunState` to the next (parameters, optimizer state and key on the
devices; epoch counter, early-stopping state, history on the host); that state is what a
checkpoint holds and what ``resume=True`` continues from, so a resumed run ends with the same
parameters, bit for bit, as an uninterrupted one.

Checkpoints (``out`` given): by default at most one save every ``checkpoint_seconds`` of wall
time, plus the last epoch, plus the epoch during which SIGINT or SIGTERM arrived (the run then
stops with :class:`Interrupted`); ``checkpoint_every=K`` saves every K epochs and the last one;
``0`` never. The store is opened, and every save written, on one worker thread
(:class:`~fnbackprop.training.checkpoint.Saver`), overlapping with the epochs and the final
outputs; a run waits for its saves before it returns or stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, NamedTuple

import jax

from fnbackprop.network import Params
from fnbackprop import parallel as parallel_lib
from fnbackprop.training import accounting, folder, outputs
from fnbackprop.training.checkpoint import CheckpointStore, Saver
from fnbackprop.training.config import TrainConfig, make_config
from fnbackprop.training.evaluation import compile_evaluate
from fnbackprop.training.prepare import (
    DeviceData,
    Prepared,
    check_x64,
    device_data,
    initial_state,
    load_data,
    prepare,
    resolve_devices,
)
from fnbackprop.training.sampling import epoch_batches
from fnbackprop.training.step import TrainState, compile_epoch, make_schedule

__all__ = ["RunState", "TrainResult", "Interrupted", "train", "check_resume"]


class RunState(NamedTuple):
    """Everything a run carries from one epoch to the next (what a checkpoint holds).

    Attributes:
      train: parameters, optimizer state and step key (on the devices).
      best_params: the best epoch's parameters when early stopping (else ``None``).
      epoch: epochs done.
      best_loss: the lowest validation loss so far (``None``: none yet).
      best_epoch: the epoch of ``best_params`` (0: the initial parameters).
      bad_epochs: epochs since the validation loss last improved.
      stop_reason: why the run stopped (``None`` while it runs).
      diverged: whether it stopped because training diverged.
      train_time_s: seconds spent in the epochs' training steps, over every session.
      truncated_batches: Poisson batches larger than the capacity (truncated).
      history: one ``metrics.jsonl`` entry per epoch.
    """

    _array_fields = ("train", "best_params")

    train: TrainState
    best_params: Params | None = None
    epoch: int = 0
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stop_reason: str | None = None
    diverged: bool = False
    train_time_s: float = 0.0
    truncated_batches: int = 0
    history: tuple = ()


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters (the best epoch's with early stopping; the last good ones
        after divergence).
      net: the trained network.
      summary: exactly what ``summary.json`` holds.
      history: one dict per epoch, exactly the ``metrics.jsonl`` lines.
    """

    params: list
    net: Any
    summary: dict
    history: list[dict]


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after an epoch; its state was checkpointed.

    Attributes:
      signum: the signal.
      epoch: the last epoch done.
    """

    def __init__(self, signum: int, epoch: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} after epoch {epoch}")
        self.signum, self.epoch = signum, epoch


class Compiled(NamedTuple):
    """The run's compiled programs: one epoch, and the evaluation of the data sets."""

    epoch: Any
    evaluate: Any


class Session(NamedTuple):
    """What one call of :func:`train` works with besides the run state (nothing of it is saved).

    Attributes:
      prep: data, network, batching, step spec, privacy plan.
      arrays: the data on the devices.
      compiled: the compiled epoch and evaluation.
      out: the output folder or ``None``.
      store: the :class:`~fnbackprop.training.checkpoint.Saver` or ``None``.
      ident: the run's identity (configuration and data fingerprint).
      epsilons: a private run's :class:`~fnbackprop.training.accounting.EpsilonSchedule`.
    """

    prep: Prepared
    arrays: DeviceData
    compiled: Compiled
    out: str | None
    store: Any
    ident: dict
    epsilons: Any


def train(config: TrainConfig | None = None, *, out: str | None = None, resume: bool = False,
          progress: bool = False, data=None, devices=None, parallel: str = "sharding",
          **overrides) -> TrainResult:
    """Trains a network on a dataset; see :mod:`fnbackprop.training` for everything it does.

    ``fb.train(dataset="digits", epochs=5, batch_size=32)`` works: keyword overrides replace
    fields of ``config``. Without ``config`` the run starts from the dataset's recommended
    settings (:func:`fnbackprop.default_config`, including its regularisation); a given
    ``config`` keeps its values and only its ``None`` fields take the dataset's defaults.

    Args:
      config: the settings (default: ``default_config(dataset)``).
      out: output folder (created if needed; must be empty unless ``resume``). ``None``: nothing
        is written to disk and there are no checkpoints.
      resume: continue the run in ``out`` from its newest readable checkpoint (start afresh if
        there is none). Its settings and data must be this run's (``run.json``).
      progress: show a tqdm progress bar on stderr.
      data: a :class:`fnbackprop.Dataset` to train on instead of loading ``config.dataset``
        (its ``name`` becomes the config's ``dataset``).
      devices: data parallelism (:mod:`fnbackprop.parallel`). ``None``: one device. ``"all"``:
        every device JAX sees (every process's, after :func:`fnbackprop.parallel.
        initialize_distributed`); an int k: the first k devices; a sequence of devices; or a
        one-axis ``jax.sharding.Mesh``. The result equals a one-device run to float rounding.
      parallel: ``"sharding"`` (one ``jit`` partitioned by XLA over a data mesh; any batch
        size) or ``"pmap"`` (the devices' gradient sums added with ``psum``; a shuffled batch
        size must be divisible by the device count; dropout masks and augmentation are drawn
        per device, so with those a pmap run is statistically, not bitwise, equal).
      **overrides: :class:`TrainConfig` fields.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: a bad setting, a non-empty ``out`` without ``resume``, a folder holding
        another run, or bad data (:class:`fnbackprop.DataError`), all before any training.
      Interrupted: SIGINT/SIGTERM arrived; the state after the current epoch was saved.
    """
    config = make_config(config, overrides, data)
    check_x64(config)
    device_list = resolve_devices(devices, parallel)
    primary = jax.process_index() == 0  # process 0 writes metrics, summary and plots
    folder.check_out(out, resume or not primary)  # the other processes share process 0's
    ds = data if data is not None else load_data(config)
    ident = folder.identity(config, ds)
    if resume:
        folder.check_reuse(out, ident)
    prep = prepare(config, ds, device_list, parallel)
    if out is not None and primary:
        folder.claim(out, ident)
    epsilons = accounting.EpsilonSchedule(prep.privacy, config.epochs) if prep.privacy else None
    arrays = device_data(prep)
    run, resumed_from = _fresh(prep), None
    store = _open_store(out, resume, config)
    try:
        if resume and store is not None and store.store.steps():
            run, resumed_from = _restore(store.store, run, prep, ident)
        t0 = time.perf_counter()
        compiled = _compile(run, prep, arrays)
        compile_s = time.perf_counter() - t0
        session = Session(prep, arrays, compiled, out, store, ident, epsilons)
        run = _epochs(run, session, progress)
        result = _finish(run, session, dict(compile_time_s=compile_s,
                                            resumed_from_epoch=resumed_from))
    finally:
        if store is not None:
            store.close()  # waits for the saves
    return result


def _fresh(prep: Prepared) -> RunState:
    """The state before the first epoch (early stopping: the initial parameters are the best)."""
    state = initial_state(prep)
    return RunState(state, best_params=state.params if prep.val is not None else None)


def _ckpt_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _open_store(out, resume: bool, config: TrainConfig) -> Saver | None:
    """The checkpoint saver (``None`` without checkpoints): on a worker thread, except with
    several processes (orbax coordinates them: every call on the main thread)."""
    if out is None or (config.checkpoint_every == 0
                       and not (resume and os.path.isdir(_ckpt_dir(out)))):
        return None
    return Saver(_ckpt_dir(out), keep=config.keep_checkpoints,
                 background=jax.process_count() == 1)


def _compile(run: RunState, prep: Prepared, arrays: DeviceData) -> Compiled:
    """The epoch and the evaluation, compiled ahead of time (so their time is measured apart)."""
    local = [d for d in prep.devices if d.process_index == jax.process_index()]
    batches = _put_batches(prep, epoch_batches(prep.batching, prep.config.seed, 0))
    epoch = compile_epoch(prep.spec, (run.train, *batches, arrays.x, arrays.y), local) \
        if run.stop_reason is None and run.epoch < prep.config.epochs else None
    evaluate = compile_evaluate(prep.net, prep.task, run.train.params, arrays.sets)
    return Compiled(epoch, evaluate)


def _put_batches(prep: Prepared, batches) -> tuple:
    """The epoch's ``(idx, mask)`` on the devices (replicated on the mesh under sharding)."""
    if prep.spec.mode == "sharding":
        return parallel_lib.replicate(prep.spec.mesh, (batches.idx, batches.mask))
    return batches.idx, batches.mask


def _epochs(run: RunState, session: Session, progress: bool) -> RunState:
    """Runs the remaining epochs, saving as the policy says; returns the final state."""
    config, out = session.prep.config, session.out
    if session.compiled.epoch is None:
        return run._replace(stop_reason=run.stop_reason or "finished")
    bar = _progress_bar(config, run.epoch) if progress else None
    last_save = last_write = time.monotonic()
    with _SignalFlag() as signals:
        while run.stop_reason is None:
            run = _one_epoch(run, session)
            if out is not None and jax.process_index() == 0 and (
                    len(run.history) == 1 or signals.signum is not None
                    or time.monotonic() - last_write >= 1.0):
                outputs.write_history(out, run.history)  # live: at most once a second
                last_write = time.monotonic()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=_fmt(_watched_loss(run.history[-1])), refresh=False)
            stopping = run.stop_reason is not None or signals.signum is not None
            if session.store is not None and not run.diverged and _save_due(
                    config, run, last_save, stopping):
                session.store.save(run.epoch, run, session.ident)
                last_save = time.monotonic()
            if signals.signum is not None and run.stop_reason is None:
                raise Interrupted(signals.signum, run.epoch)
    if bar is not None:
        bar.close()
    return run


def _one_epoch(run: RunState, session: Session) -> RunState:
    """One epoch of training, its evaluation, and the early-stopping/divergence decision."""
    prep, arrays, compiled = session.prep, session.arrays, session.compiled
    t0 = time.perf_counter()
    batches = epoch_batches(prep.batching, prep.config.seed, run.epoch)
    state, stats = compiled.epoch(run.train, *_put_batches(prep, batches), arrays.x, arrays.y)
    stats = jax.device_get(stats)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    lr = make_schedule(prep.spec.optimizer)(run.epoch * prep.steps_per_epoch)
    entry = outputs.epoch_entry(run.epoch + 1, _evaluations(session, state.params), stats, lr,
                                seconds, diagnostics=prep.config.logs_training_data)
    if session.epsilons is not None:
        entry["epsilon"] = session.epsilons.get(run.epoch + 1)
    run = run._replace(truncated_batches=run.truncated_batches + batches.truncated)
    return _advance(run, state, entry, prep)


def _evaluations(session: Session, params) -> dict:
    """``{"test_loss": ..., "test_accuracy": ..., ...}`` of ``params`` on every set."""
    metric = "accuracy" if session.prep.task == "classification" else "r2"
    evals = {}
    for name, (loss, value) in zip(session.arrays.names, jax.device_get(
            session.compiled.evaluate(params, session.arrays.sets))):
        evals[f"{name}_loss"], evals[f"{name}_{metric}"] = float(loss), float(value)
    return evals


def _watched_loss(entry: dict):
    """The loss that tells divergence: training loss, or test loss when it is not logged."""
    return entry["train_loss"] if "train_loss" in entry else entry["test_loss"]


def _advance(run: RunState, state: TrainState, entry: dict, prep: Prepared) -> RunState:
    """The state after an epoch that ended in ``state`` with metrics ``entry``."""
    epoch = run.epoch + 1
    spent = run.train_time_s + entry["epoch_time_s"]
    ok_steps = entry["steps"] - entry["skipped_steps"]
    if _watched_loss(entry) is None or ok_steps == 0:  # diverged: keep the last good state
        keep_best = prep.val is not None and run.best_epoch > 0
        why = ("every step was skipped (non-finite gradients)" if ok_steps == 0
               else f"the {'training' if 'train_loss' in entry else 'test'} loss is not finite")
        kept = run.best_epoch if keep_best else epoch - 1
        return run._replace(
            epoch=epoch, train_time_s=spent, history=run.history + ({**entry, "diverged": True},),
            diverged=True, best_epoch=kept,
            best_params=run.best_params if keep_best else run.train.params,
            stop_reason=(f"diverged in epoch {epoch}: {why}; kept the "
                         f"{'best' if keep_best else 'last good'} parameters (epoch {kept})"))
    run = run._replace(train=state, epoch=epoch, train_time_s=spent,
                       history=run.history + (entry,))
    if prep.val is None:
        run = run._replace(best_epoch=epoch)
    elif entry["val_loss"] is not None and (run.best_loss is None
                                            or entry["val_loss"] < run.best_loss):
        run = run._replace(best_loss=entry["val_loss"], best_epoch=epoch,
                           best_params=state.params, bad_epochs=0)
    else:
        run = run._replace(bad_epochs=run.bad_epochs + 1)
    if prep.val is not None and run.bad_epochs >= prep.config.early_stopping:
        return run._replace(stop_reason=f"early stopping: no lower validation loss for "
                                        f"{run.bad_epochs} epochs")
    return run._replace(stop_reason="finished") if epoch >= prep.config.epochs else run


def _save_due(config: TrainConfig, run: RunState, last_save: float, stopping: bool) -> bool:
    """Whether to checkpoint after this epoch (see the module docstring)."""
    if config.checkpoint_every == 0:
        return False
    if stopping:
        return True
    if config.checkpoint_every is None:
        return time.monotonic() - last_save >= config.checkpoint_seconds
    return run.epoch % config.checkpoint_every == 0


def _restore(store: CheckpointStore, template: RunState, prep: Prepared, ident: dict):
    """``(state, step)`` of the newest readable checkpoint, after checking it is this run's."""
    restored = store.restore(template, accept=lambda extra: folder.check_same_run(
        extra, ident, store.directory))
    run = restored.state
    if prep.spec.mode == "sharding":
        run = run._replace(train=parallel_lib.replicate(prep.spec.mesh, run.train))
    for path in restored.unreadable:
        warnings.warn(f"checkpoint {os.path.basename(path)} could not be read (moved to {path}); "
                      f"resuming from the checkpoint of epoch {restored.step}", stacklevel=3)
    return run, restored.step


def _finish(run: RunState, session: Session, facts: dict) -> TrainResult:
    """The final evaluation, ``summary.json`` (with the privacy block of a private run), the
    history and the plots."""
    prep, out = session.prep, session.out
    final = run.best_params if (prep.val is not None or run.diverged) else run.train.params
    if session.epsilons is not None:  # fill in the ε the worker had not computed yet
        eps = session.epsilons.result()
        run = run._replace(history=tuple({**h, "epsilon": eps[h["epoch"] - 1]}
                                         for h in run.history))
    evals = dict(zip(session.arrays.names, (tuple(map(float, e)) for e in jax.device_get(
        session.compiled.evaluate(final, session.arrays.sets)))))
    spec, ds = prep.spec, prep.data
    fields = {
        "best_epoch": run.best_epoch if run.history else 0,
        "stop_reason": run.stop_reason,
        "diverged": run.diverged,
        "train_time_s": run.train_time_s,
        **facts,
        "params_sha256": outputs.params_sha256(final),
        "network": repr(prep.net),
        "num_params": prep.net.num_params,
        "n_train": int(ds.x_train.shape[0]),
        "n_val": int(prep.val[0].shape[0]) if prep.val is not None else 0,
        "n_test": int(ds.x_test.shape[0]),
        "batch_size": prep.batch,
        "steps_per_epoch": prep.steps_per_epoch,
        "devices": len(prep.devices),
        "device_kinds": sorted({f"{d.platform}:{getattr(d, 'device_kind', '?')}"
                                for d in prep.devices}),
        "parallel": spec.mode if spec.mode != "single" else None,
        "processes": jax.process_count(),
    }
    if prep.privacy is not None:
        epsilon = run.history[-1]["epsilon"] if run.history else 0.0
        fields["privacy"] = accounting.privacy_block(
            prep.privacy, epsilon, run.epoch * prep.steps_per_epoch, prep.config,
            run.truncated_batches)
    summary = outputs.summary(config=prep.config.to_dict(), task=prep.task,
                              final=evals, history=run.history, fields=fields)
    if out is not None and jax.process_index() == 0:
        from fnbackprop.diagnostics import plot_history

        outputs.write_history(out, run.history)
        outputs.write_json(os.path.join(out, "summary.json"), summary)
        plot_history(run.history, out, task=prep.task)
    return TrainResult(final, prep.net, summary, list(run.history))


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.4g}"


def _progress_bar(config: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs, initial=initial, desc=f"train {config.dataset}",
                unit="epoch", file=sys.stderr, leave=True)


class _SignalFlag(contextlib.AbstractContextManager):
    """Records SIGINT/SIGTERM (``signum``) instead of dying mid-epoch; a second one interrupts
    at once. Installed only on the main thread (elsewhere signals cannot be caught)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def check_resume(config: TrainConfig | None = None, out: str | None = None, *, data=None,
                 **overrides) -> int | None:
    """Checks, without changing anything, that ``train(config, out=out, resume=True)`` can
    continue the run in ``out``: same configuration, same data.

    Returns:
      The epoch of the newest checkpoint, or ``None`` when there is none (the run would start
      afresh).

    Raises:
      ValueError: ``out`` is missing or not a folder; :class:`~fnbackprop.training.checkpoint.
        CheckpointError` when ``out`` holds another run (settings or data).
    """
    config = make_config(config, overrides, data)
    if out is None:
        raise ValueError("resuming needs out= (the folder holding the checkpoints)")
    folder.check_out(out, True)
    ident = folder.identity(config, data if data is not None else load_data(config))
    folder.check_reuse(out, ident)
    if not os.path.isdir(_ckpt_dir(out)):
        return None
    with CheckpointStore(_ckpt_dir(out), keep=config.keep_checkpoints) as store:
        steps = store.steps()
        extra = store.read_extra(steps[-1]) if steps else None
        if extra is not None:
            folder.check_same_run(extra, ident, out)
        return steps[-1] if steps else None
