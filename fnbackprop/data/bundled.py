"""The bundled datasets: scikit-learn sets, synthetic xor/spirals, and generated MNIST-1D."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from types import MappingProxyType
from typing import Any

import numpy as np

from fnbackprop.data import cache
from fnbackprop.data.dataset import (
    TEST_FRACTION,
    DataError,
    Dataset,
    DatasetInfo,
    make_dataset,
)
from fnbackprop.data.preprocessing import split_indices

DATASETS: tuple[str, ...] = (
    "digits", "breast_cancer", "diabetes", "mnist1d", "mnist1d_60k", "xor", "spirals",
)
SPLIT_SEED = 0
"""Seed of the fixed test split of the bundled datasets (never the training seed)."""
SYNTHETIC_SEED = 1234
"""Seed of the fixed synthetic datasets (xor, spirals)."""
SYNTHETIC_SIZE = 1000
"""Examples generated for each synthetic dataset (before the 80/20 split)."""

DATASET_INFO: MappingProxyType = MappingProxyType({
    "digits": DatasetInfo("classification", 10, 1438, 359, 64, "shift_noise", (8, 8),
                          "scikit-learn load_digits: 8x8 handwritten digits, pixels 0..16"),
    "breast_cancer": DatasetInfo("classification", 2, 455, 114, 30, "noise", None,
                                 "scikit-learn load_breast_cancer: Wisconsin diagnostic"),
    "diabetes": DatasetInfo("regression", None, 354, 88, 10, "noise", None,
                            "scikit-learn load_diabetes(scaled=False): disease progression"),
    "mnist1d": DatasetInfo("classification", 10, 4000, 1000, 40, "shift_noise", (40,),
                           "mnist1d make_dataset, default arguments (seed 42)"),
    "mnist1d_60k": DatasetInfo("classification", 10, 48000, 12000, 40, "shift_noise", (40,),
                               "mnist1d make_dataset, default arguments but 60000 samples "
                               "(seed 42)"),
    "xor": DatasetInfo("classification", 2, 800, 200, 2, "noise", None,
                       "synthetic: uniform points in [-1, 1]^2, label = sign(x0) != sign(x1)"),
    "spirals": DatasetInfo("classification", 2, 800, 200, 2, "noise", None,
                           "synthetic: two interleaved noisy spirals"),
})
"""Per bundled dataset: task, classes, train/test sizes, features, augmentation, source."""

_MNIST1D_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    num_samples=5000, train_split=0.8, template_len=12, padding=(36, 60), scale_coeff=0.4,
    max_translation=48, corr_noise_scale=0.25, iid_noise_scale=0.02, shear_scale=0.75,
    shuffle_seq=False, final_seq_length=40, seed=42,
))

MNIST1D_ARGS: MappingProxyType = MappingProxyType({
    "mnist1d": _MNIST1D_DEFAULTS,
    "mnist1d_60k": MappingProxyType({**_MNIST1D_DEFAULTS, "num_samples": 60_000}),
})
"""Per generated dataset: the arguments given to ``mnist1d.data.make_dataset``.

They are ``mnist1d.data.get_dataset_args()`` written out (without ``url``, which only serves
downloads, never made here), so that the cache key is known without importing the generator;
mnist1d_60k changes only ``num_samples``. The generator's own ``train_split`` makes the test set.
"""


def load_bundled(name: str) -> Dataset:
    """The bundled dataset ``name`` (one of :data:`DATASETS`) with its fixed split."""
    if name in MNIST1D_ARGS:
        return _mnist1d(name)
    if name in ("xor", "spirals"):
        return _synthetic(name)
    return _sklearn(name)


def _sklearn(name: str) -> Dataset:
    import sklearn.datasets  # imported on use: it is slow to import

    info = DATASET_INFO[name]
    if name == "diabetes":
        x, y = sklearn.datasets.load_diabetes(return_X_y=True, scaled=False)
    else:
        x, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    train_idx, test_idx = split_indices(y, len(y), TEST_FRACTION, SPLIT_SEED,
                                        stratify=info.task == "classification")
    return make_dataset(name, info.task, x, y, train_idx, test_idx, info.num_classes,
                        info.augment_kind, info.image_shape)


def _xor(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, size=(SYNTHETIC_SIZE, 2))
    y = ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int32)
    return x, y


def _spirals(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(SYNTHETIC_SIZE) % 2
    t = np.sqrt(rng.uniform(0.0, 1.0, SYNTHETIC_SIZE))   # radius; sqrt spreads points evenly
    theta = 3.0 * np.pi * t + np.pi * y                   # 1.5 turns, second arm rotated by π
    x = np.stack([t * np.cos(theta), t * np.sin(theta)], axis=1)
    x = x + rng.normal(0.0, 0.03, size=x.shape)
    return x, y


def _synthetic(name: str) -> Dataset:
    info = DATASET_INFO[name]
    make = _xor if name == "xor" else _spirals
    x, y = make(np.random.default_rng(SYNTHETIC_SEED))
    train_idx, test_idx = split_indices(y, len(y), TEST_FRACTION, SPLIT_SEED, stratify=True)
    return make_dataset(name, info.task, x, y, train_idx, test_idx, info.num_classes,
                        info.augment_kind, info.image_shape)


# ----------------------------------------------------------------------------------------------
# MNIST-1D: generated once, then read from the cache


_MNIST1D_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _mnist1d_key(args: Mapping[str, Any]) -> str:
    """The cache key of the arrays ``make_dataset(args)`` gives: no import of mnist1d needed."""
    try:
        installed = version("mnist1d")   # package metadata only: the package is not imported
    except PackageNotFoundError:
        installed = None
    return cache.cache_key({"generator": "mnist1d.data.make_dataset", "args": dict(args),
                            "mnist1d": installed})


def _mnist1d(name: str) -> Dataset:
    info = DATASET_INFO[name]
    args = MNIST1D_ARGS[name]
    key = _mnist1d_key(args)
    path = os.path.join(cache.cache_dir(), f"{name}-{key}.npz")
    expected = {
        "x_train": ((info.n_train, info.n_features), np.dtype(np.float32)),
        "y_train": ((info.n_train,), np.dtype(np.int32)),
        "x_test": ((info.n_test, info.n_features), np.dtype(np.float32)),
        "y_test": ((info.n_test,), np.dtype(np.int32)),
    }
    arrays = cache.read_arrays(path, key, expected)
    if arrays is None:
        arrays = dict(zip(_MNIST1D_ARRAYS, _generate_mnist1d(args)))
        if not cache.conforms(arrays, expected):
            shapes = ", ".join(f"{k} {a.shape} {a.dtype}" for k, a in arrays.items())
            raise DataError(f"{name}: the mnist1d generator gave {shapes}; expected "
                            f"{info.n_train} + {info.n_test} examples of {info.n_features} "
                            "float32 features and int32 labels")
        cache.write_arrays(path, key, arrays)
    x = np.concatenate([arrays["x_train"], arrays["x_test"]])
    y = np.concatenate([arrays["y_train"], arrays["y_test"]])
    n_tr = info.n_train
    return make_dataset(name, info.task, x, y, np.arange(n_tr), np.arange(n_tr, len(y)),
                        info.num_classes, info.augment_kind, info.image_shape)


def _generate_mnist1d(args: Mapping[str, Any]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from ``mnist1d.data.make_dataset(args)``.

    Inputs are float32 ``(N, 40)``, labels int32 ``(N,)``. The generator seeds the global NumPy
    and ``random`` generators; their states are restored afterwards.
    """
    from mnist1d.data import make_dataset as generate  # the only import of mnist1d
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = generate(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32),
            np.asarray(d["x_test"], np.float32), np.asarray(d["y_test"], np.int32))
