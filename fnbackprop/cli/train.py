"""``fnbackprop train``: the main job, every flag a field of :class:`fnbackprop.TrainConfig`."""

from __future__ import annotations

import argparse
import sys

from fnbackprop.cli.args import (
    UsageError,
    parse_int_list,
    positive_float,
    positive_int,
    probability,
    rate,
)

__all__ = ["add_parser", "TRAIN_FIELDS"]


class _PlainFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with the defaults written into each flag's text (some depend on the dataset)."""


def _batch_size(text: str):
    if text.strip().lower() == "full":
        return "full"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-size must be an integer ≥ 1 or 'full', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be an integer ≥ 1 or 'full', got {v}")
    return v


def _hidden_widths(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "--hidden needs comma-separated widths (e.g. 64,64), or 'none' for no hidden layer")
    try:
        return parse_int_list(text, "--hidden")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _conv_layers(text: str) -> tuple[tuple[int, int, int], ...]:
    if text.strip().lower() == "none":
        return ()
    layers = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (2, 3) or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"--conv: {item.strip()!r} in {text!r} is not CHANNELS:KERNEL[:STRIDE] with "
                "integers ≥ 1 (e.g. 25:5 or 25:5:2), or 'none'")
        layers.append(tuple(values) + (1,) * (3 - len(values)))
    return tuple(layers)


def _conv_text(conv) -> str:
    """``((25, 5, 1), (25, 5, 2))`` as the flag writes it: ``25:5,25:5:2``."""
    return ",".join(f"{c}:{k}" + (f":{s}" if s != 1 else "") for c, k, s in conv) or "none"


def _train_epilog() -> str:
    from fnbackprop.training.config import DATASET_DEFAULTS, GENERIC_DEFAULTS

    lines = ["per-dataset defaults (what a flag left out means; 'other' lists further settings):",
             f"  {'dataset':<14} {'hidden':<9} {'activation':<10} {'init':<13} {'optimizer':<9} "
             f"{'lr':<6} {'batch':<5} {'epochs':<6} other"]
    rows = list(DATASET_DEFAULTS.items()) + [(".npz/.csv file", GENERIC_DEFAULTS)]
    main = ("hidden", "activation", "init", "optimizer", "lr", "batch_size", "epochs")
    for name, d in rows:
        hidden = ",".join(str(h) for h in d["hidden"]) or "none"
        other = ", ".join(f"{k}={_conv_text(v) if k == 'conv' else v}" for k, v in d.items()
                          if k not in main) or "-"
        lines.append(f"  {name:<14} {hidden:<9} {d['activation']:<10} {d['init']:<13} "
                     f"{d['optimizer']:<9} {d['lr']:<6g} {d['batch_size']!s:<5} {d['epochs']!s:<6} "
                     f"{other}")
    lines += [
        "",
        "outputs in --out: metrics.jsonl (one line per epoch), summary.json, curves.png,",
        "gradient_flow.png, checkpoints/ (orbax), run.json (the run's settings and data",
        "fingerprint). Exit status: 0 done, 1 diverged, 2 bad input (nothing was changed),",
        "3 internal error (with a traceback), 130/143 interrupted by SIGINT/SIGTERM (the state is",
        "saved: continue with --resume).",
        "Compiled epochs are cached on disk (JAX's persistent compilation cache, in",
        "$JAX_COMPILATION_CACHE_DIR or ~/.cache/fnbackprop/jax); FNBACKPROP_COMPILE_CACHE=0 turns",
        "that off.",
    ]
    return "\n".join(lines)


TRAIN_FIELDS = (
    "dataset", "target", "task", "conv", "hidden", "activation", "init", "optimizer", "lr", "schedule",
    "batch_size", "epochs", "l1", "l2", "dropout", "clip_norm", "clip_value", "per_example_clip",
    "noise_multiplier", "target_epsilon", "delta", "accountant", "sampling",
    "physical_batch_size", "train_metrics", "early_stopping", "val_fraction", "augment",
    "gradient", "seed", "checkpoint_every", "checkpoint_seconds", "keep_checkpoints", "dtype",
)
"""The ``train`` flags, one per :class:`fnbackprop.training.TrainConfig` field (tested)."""


def add_parser(sub) -> None:
    from fnbackprop.activations import HIDDEN_ACTIVATIONS
    from fnbackprop.data import DATASETS
    from fnbackprop.network import INIT_SCHEMES
    from fnbackprop.training.config import (
        ACCOUNTANTS,
        DTYPES,
        GRADIENTS,
        OPTIMIZERS,
        SAMPLINGS,
        SCHEDULES,
    )

    p = sub.add_parser(
        "train",
        help="train an MLP with the hand-derived gradients (the main job: digits by default)",
        description="Trains an MLP on a bundled dataset or your .npz/.csv file with the\n"
        "hand-derived backward pass, prints a gradient check of the first batch, and writes\n"
        "metrics, a summary, plots and checkpoints to --out. With no flags: digits with its\n"
        "recommended settings. Every flag maps onto a fnbackprop.TrainConfig field; a flag\n"
        "left out takes the dataset's default (table below).",
        epilog=_train_epilog(),
        formatter_class=_PlainFormatter,
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a("--dataset", metavar="NAME|PATH",
      help=f"bundled dataset ({', '.join(DATASETS)}) or a path to a .npz (arrays x, y) or .csv "
      "file (default: digits)")
    a("--target", metavar="COLUMN",
      help=".csv target column name (default: the last column)")
    a("--task", choices=("classification", "regression"),
      help="for a .npz/.csv file: classification or regression (default: guessed from the "
      "targets)")
    a("--conv", type=_conv_layers, metavar="C:K[:S],...",
      help="1-D convolution layers before the dense ones: channels C, kernel K, stride S "
      "(default 1), SAME padding, the hidden activation, e.g. 25:5,25:5:2; 'none' for none; "
      "for data with a signal shape such as mnist1d (default: per dataset; none when --hidden "
      "is given)")
    a("--hidden", type=_hidden_widths, metavar="W1,W2,...",
      help="dense hidden-layer widths (after the convolutions), e.g. 64,64; 'none' for no "
      "hidden layer (default: per dataset)")
    a("--activation", choices=HIDDEN_ACTIVATIONS,
      help="hidden activation (default: per dataset)")
    a("--init", choices=INIT_SCHEMES, help="initialisation (default: per dataset)")
    a("--optimizer", choices=OPTIMIZERS, help="optax optimiser (default: per dataset)")
    a("--lr", type=positive_float("--lr"), help="learning rate > 0 (default: per dataset)")
    a("--schedule", choices=SCHEDULES,
      help="learning-rate schedule over all steps: cosine decays to 0, exponential to 1%%, step "
      "×0.1 at 50%% and 75%% (default: constant)")
    a("--batch-size", type=_batch_size, metavar="N|full",
      help="mini-batch size, 1 for SGD, 'full' for full-batch gradient descent "
      "(default: per dataset)")
    a("--epochs", type=positive_int("--epochs"),
      help="passes over the training set (default: per dataset)")
    a("--l1", type=positive_float("--l1", allow_zero=True),
      help="L1 penalty strength ≥ 0 (default: 0)")
    a("--l2", type=positive_float("--l2", allow_zero=True),
      help="L2 penalty strength ≥ 0 (default: 0)")
    a("--dropout", type=rate("--dropout"),
      help="dropout rate of the hidden layers, in [0, 1) (default: 0; digits: 0.5)")
    a("--clip-norm", type=positive_float("--clip-norm"), metavar="C",
      help="clip each batch gradient to global norm C (default: off)")
    a("--clip-value", type=positive_float("--clip-value"), metavar="V",
      help="clip every gradient entry to ±V (default: off)")
    a("--per-example-clip", type=positive_float("--per-example-clip"), metavar="C",
      help="clip every example's gradient to norm C (fb.clipped_grad) (default: off)")
    a("--noise-multiplier", type=positive_float("--noise-multiplier", allow_zero=True),
      metavar="SIGMA",
      help="Gaussian noise σ·C on the clipped gradient sum, with --per-example-clip (default: 0)")
    g = p.add_argument_group(
        "private training (DP-SGD)",
        "With --noise-multiplier or --target-epsilon the run reports (ε, δ) per epoch and in\n"
        "summary.json (accounted with dp-accounting). Batches are Poisson samples (each example\n"
        "with probability B/N, the sampling the accountants price); metrics computed from the\n"
        "training data are off unless --train-metrics (they are outside the guarantee).")
    g.add_argument("--target-epsilon", type=positive_float("--target-epsilon"), metavar="E",
                   help="choose the smallest noise multiplier whose ε after the last epoch is at "
                   "most E (excludes --noise-multiplier) (default: off)")
    g.add_argument("--delta", type=probability("--delta"), metavar="D",
                   help="δ of the guarantee (default: 1e-5, or 1/(10·N) when the training set "
                   "has N > 10^4 examples)")
    g.add_argument("--accountant", choices=ACCOUNTANTS,
                   help="pld: privacy loss distributions; rdp: Rényi DP (default: pld)")
    g.add_argument("--sampling", choices=SAMPLINGS,
                   help="poisson: each example in each batch independently with probability B/N; "
                   "shuffle: each example once per epoch (reports the ε of shuffled batches, "
                   "without amplification) (default: poisson with noise, else shuffle)")
    g.add_argument("--physical-batch-size", type=positive_int("--physical-batch-size"),
                   metavar="P", help="with --per-example-clip: process each batch in chunks of P "
                   "rows, noise drawn once (default: the whole batch at once)")
    g.add_argument("--train-metrics", action=argparse.BooleanOptionalAction,
                   help="metrics of the training data: training loss and accuracy, gradient "
                   "and δ norms, the first-batch check (default: on, off with noise)")
    a("--early-stopping", type=positive_int("--early-stopping"), metavar="PATIENCE",
      help="stop after PATIENCE epochs without a lower validation loss and keep the best "
      "parameters (default: off)")
    a("--val-fraction", type=rate("--val-fraction"), metavar="F",
      help="fraction of the training set held out for validation with --early-stopping "
      "(default: 0.1)")
    a("--augment", action=argparse.BooleanOptionalAction,
      help="augment training batches: shifts and noise (digits, mnist1d), noise (tabular) "
      "(default: off; mnist1d: on)")
    a("--gradient", choices=GRADIENTS,
      help="manual: hand-derived δ recursion; autodiff: jax.grad (default: manual)")
    a("--seed", type=positive_int("--seed", allow_zero=True), help="PRNG seed ≥ 0 (default: 0)")
    a("--checkpoint-every", type=positive_int("--checkpoint-every", allow_zero=True),
      metavar="K", help="save a checkpoint every K epochs and at the end; 0: never (default: "
      "by wall time, see --checkpoint-seconds)")
    a("--checkpoint-seconds", type=positive_float("--checkpoint-seconds"), metavar="S",
      help="without --checkpoint-every: save at most once every S seconds, after the last "
      "epoch, and when interrupted by Ctrl-C or SIGTERM (default: 60)")
    a("--keep-checkpoints", type=positive_int("--keep-checkpoints"), metavar="N",
      help="keep the newest N checkpoints (default: 3)")
    a("--dtype", choices=DTYPES, help="floating dtype (default: float32)")
    a("--out", default=None, metavar="DIR",
      help="output folder; must be new or empty unless --resume (default: a new folder "
      "runs/DATASET-YYYYmmdd-HHMMSS)")
    a("--resume", action="store_true", default=False,
      help="continue the run in --out from its newest complete checkpoint; give the same flags "
      "as the first time (default: off)")
    a("--quiet", action="store_true", default=False,
      help="no progress bar and no gradient check, only the result (default: off)")
    g = p.add_argument_group(
        "data parallelism",
        "Parameters and optimizer state are replicated; every global batch is split over the "
        "devices; results equal a one-device run. Several processes (hosts): start the same "
        "command on each with --coordinator HOST:PORT (process 0's address), --num-processes N "
        "and its own --process-id I, and the same --out on a shared folder; process 0 writes "
        "the outputs.")
    g.add_argument("--data-parallel", action="store_true", default=False,
                   help="use every device JAX sees (default: off, one device)")
    g.add_argument("--parallel", choices=("sharding", "pmap"), default="sharding",
                   help="sharding: one jit partitioned over a device mesh (any batch size); "
                   "pmap: lax.pmean of per-device gradients (batch size divisible by the "
                   "device count) (default: sharding)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="join a multi-process run through jax.distributed (default: none)")
    g.add_argument("--num-processes", type=positive_int("--num-processes"), default=None,
                   metavar="N", help="number of processes of a multi-process run (default: none)")
    g.add_argument("--process-id", type=positive_int("--process-id", allow_zero=True),
                   default=None, metavar="I", help="this process's index in [0, N) (default: none)")
    p.set_defaults(func=_cmd_train)


def _default_out(dataset: str) -> str:
    import datetime
    import os

    stem = os.path.splitext(os.path.basename(dataset))[0] or "data"
    base = os.path.join("runs", f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out, i = base, 2
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def _enable_compile_cache(cache_root: str) -> None:
    """Turns on JAX's persistent compilation cache for this process (the command line only).

    A repeated run then loads its compiled epoch from disk instead of compiling it again. The
    folder is ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``CACHE/jax`` (``CACHE``: see
    :func:`fnbackprop.data.cache_dir`); ``FNBACKPROP_COMPILE_CACHE=0`` turns it off.
    """
    import os

    import jax

    if os.environ.get("FNBACKPROP_COMPILE_CACHE", "1") == "0":
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root, "jax"))
    # Everything, even the small programs of the op-by-op gradient check (~40 ms each to compile).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _cmd_train(args) -> int:
    config = _config(args)
    primary = args.process_id in (None, 0)
    _check_processes(args)
    import jax

    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.coordinator is not None:
        from fnbackprop.parallel import initialize_distributed

        try:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:
            raise UsageError(str(e)) from None
    from fnbackprop import data as data_lib
    from fnbackprop import training
    from fnbackprop.training import folder
    from fnbackprop.training.prepare import load_data

    try:
        ds = load_data(config)
    except ValueError as e:  # DataError: a missing or bad file
        raise UsageError(" ".join(str(e).split())) from None
    out = args.out if args.out is not None else _default_out(config.dataset)
    try:
        folder.check_out(out, args.resume or not primary)  # the others share process 0's
        if args.resume:
            training.check_resume(config, out, data=ds)
    except ValueError as e:  # an unusable --out, or (CheckpointError) another run in it
        raise UsageError(" ".join(str(e).replace("output folder", "--out", 1).split())) from None
    _enable_compile_cache(data_lib.cache_dir())  # everything is validated: the work starts
    try:
        if primary and not args.resume and not args.quiet and config.logs_training_data:
            _print_first_batch_check(config, ds)
        result = training.train(config, out=out, resume=args.resume,
                                progress=primary and not args.quiet and sys.stderr.isatty(),
                                data=ds, devices="all" if (args.data_parallel or args.coordinator)
                                else None, parallel=args.parallel)
    except training.Interrupted as e:
        sys.stderr.write(f"fnbackprop train: {e}; its state is saved: continue with --resume "
                         f"--out {out}\n")
        return 128 + e.signum
    except ValueError as e:  # raised before any training: a network too large for the memory,
        # every checkpoint unreadable, a batch size that --parallel pmap cannot split evenly
        raise UsageError(" ".join(str(e).split())) from None
    return _report(result, config, out)


def _config(args):
    """The run's :class:`fnbackprop.TrainConfig` from the flags (the dataset's defaults first)."""
    from fnbackprop.training.config import make_config

    given = {f: getattr(args, f) for f in TRAIN_FIELDS if hasattr(args, f)}
    try:
        return make_config(None, given)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_processes(args) -> None:
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR (the folder of the run to continue)")
    multi = (args.coordinator, args.num_processes, args.process_id)
    if all(v is None for v in multi):
        return
    if any(v is None for v in multi):
        raise UsageError("a multi-process run needs all of --coordinator HOST:PORT, "
                         "--num-processes N and --process-id I")
    if args.process_id >= args.num_processes:
        raise UsageError(f"--process-id {args.process_id} must be in [0, {args.num_processes})")
    if args.out is None:
        raise UsageError("a multi-process run needs --out DIR (the same folder for all)")


def _print_first_batch_check(config, ds) -> None:
    from fnbackprop import training

    report = training.check_first_batch(config, data=ds)
    print(f"gradient check of the first batch ({report.dtype}): manual vs jax.grad max rel "
          f"{report.max_rel_autodiff:.1e} (tol {report.tol_autodiff:g}), vs finite "
          f"differences max rel {report.max_rel_fd:.1e} (tol {report.tol_fd:g}): "
          f"{'passed' if report.passed else 'FAILED'}")
    if not report.passed:
        print(report)


def _report(result, config, out) -> int:
    s = result.summary
    metric = (f"test accuracy {s['test_accuracy']:.4f}" if "test_accuracy" in s
              else f"test R² {s['test_r2']:.4f}")
    if s["devices"] > 1:
        print(f"data parallel ({s['parallel']}): {s['devices']} devices in "
              f"{s['processes']} process(es)")
    print(f"{config.dataset}: {metric}, test loss {s['test_loss']:.4f} after {s['epochs_run']} "
          f"epochs ({s['stop_reason']}); training {s['train_time_s']:.2f} s, compile "
          f"{s['compile_time_s']:.2f} s")
    if "privacy" in s:
        pv = s["privacy"]
        print(f"privacy: (ε = {pv['epsilon']:.4g}, δ = {pv['delta']:.3g})-DP ({pv['accountant']} "
              f"accountant, {pv['sampling']} sampling, σ = {pv['noise_multiplier']:.4g}, C = "
              f"{pv['clip_norm']:g}; δ: {pv['delta_reason']}); not covered: "
              f"{len(pv['not_covered'])} item(s), see summary.json")
    import os

    names = sorted(n + "/" * os.path.isdir(os.path.join(out, n)) for n in os.listdir(out))
    print(f"outputs: {out}/ ({', '.join(names)})")
    if s["diverged"]:
        sys.stderr.write(f"fnbackprop train: {s['stop_reason']}\n")
        return 1
    return 0
