"""The generated MNIST-1D datasets: cache keys, no mnist1d import on a cache hit, mnist1d_60k."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fnbackprop import data as D
from fnbackprop.data import DataError, bundled, load_dataset

GENERATED = tuple(D.MNIST1D_ARGS)


def _fake(args):
    """A stand-in for the generator: the shapes, dtypes and split its ``args`` ask for."""
    n = args["num_samples"]
    n_train = int(n * args["train_split"])
    x = np.random.default_rng(n).normal(size=(n, args["final_seq_length"])).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty private cache folder and the fake generator."""
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bundled, "_generate_mnist1d", _fake)
    return tmp_path


def _block_mnist1d_import(monkeypatch):
    """Make every ``import mnist1d...`` raise ImportError until the test ends."""
    for name in [m for m in sys.modules if m == "mnist1d" or m.startswith("mnist1d.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mnist1d", None)


def test_written_out_arguments_are_the_generators_defaults():
    from mnist1d.data import get_dataset_args

    ref = get_dataset_args(as_dict=True)
    ref.pop("url")
    ref["padding"] = tuple(ref["padding"])
    assert dict(D.MNIST1D_ARGS["mnist1d"]) == ref
    assert dict(D.MNIST1D_ARGS["mnist1d_60k"]) == {**ref, "num_samples": 60_000}


@pytest.mark.parametrize("name", GENERATED)
def test_info_sizes_follow_the_generator_arguments(name):
    args, info = D.MNIST1D_ARGS[name], D.DATASET_INFO[name]
    assert info.n_train == int(args["num_samples"] * args["train_split"])
    assert info.n_train + info.n_test == args["num_samples"]
    assert info.n_features == args["final_seq_length"] and info.image_shape == (40,)
    assert info.augment_kind == "shift_noise" and info.num_classes == 10
    assert name in D.DATASETS


def test_cache_hit_does_not_import_mnist1d(tmp_path, monkeypatch):
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(bundled, "_generate_mnist1d", _fake)
        first = load_dataset("mnist1d")        # the fake generator fills the cache
    _block_mnist1d_import(monkeypatch)         # the real generator again, unable to import
    again = load_dataset("mnist1d")
    assert again.x_train.tobytes() == first.x_train.tobytes()
    for f in tmp_path.iterdir():
        f.unlink()
    with pytest.raises(ImportError):           # a miss does import mnist1d: the block works
        load_dataset("mnist1d")


def test_generated_sets_have_their_own_cache_files(fake_cache):
    small, large = load_dataset("mnist1d"), load_dataset("mnist1d_60k")
    assert small.x_train.shape == (4000, 40) and small.x_test.shape == (1000, 40)
    assert large.x_train.shape == (48000, 40) and large.x_test.shape == (12000, 40)
    assert large.name == "mnist1d_60k" and large.augment_kind == "shift_noise"
    assert large.image_shape == (40,) and large.num_classes == 10
    names = sorted(f.name for f in fake_cache.iterdir())
    assert len(names) == 2
    assert names[0].startswith("mnist1d-") and names[1].startswith("mnist1d_60k-")
    np.testing.assert_array_equal(large.x_test, _fake(D.MNIST1D_ARGS["mnist1d_60k"])[2])


def test_cache_key_follows_arguments_and_installed_version(fake_cache, monkeypatch):
    args = D.MNIST1D_ARGS["mnist1d"]
    key = bundled._mnist1d_key(args)
    assert bundled._mnist1d_key(dict(args)) == key and len(key) == 16
    assert bundled._mnist1d_key({**args, "seed": 43}) != key
    load_dataset("mnist1d")
    calls = []
    monkeypatch.setattr(bundled, "version", lambda package: "99.0")
    monkeypatch.setattr(bundled, "_generate_mnist1d", lambda a: calls.append(a) or _fake(a))
    assert bundled._mnist1d_key(args) != key
    load_dataset("mnist1d")                    # another mnist1d version: generated anew
    assert len(calls) == 1 and len(list(fake_cache.iterdir())) == 2


def test_a_generator_of_other_shapes_is_refused(fake_cache, monkeypatch):
    monkeypatch.setattr(bundled, "_generate_mnist1d",
                        lambda a: _fake({**a, "train_split": 0.5}))
    with pytest.raises(DataError, match=r"mnist1d_60k: the mnist1d generator gave x_train "
                                        r"\(30000, 40\)"):
        load_dataset("mnist1d_60k")
    assert list(fake_cache.iterdir()) == []    # nothing cached


@pytest.mark.slow
def test_mnist1d_60k_is_the_generators_own_split(tmp_path, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(tmp_path))
    ds = load_dataset("mnist1d_60k")
    args = get_dataset_args()
    args.num_samples = 60_000
    state = np.random.get_state()
    ref = make_dataset(args)
    np.random.set_state(state)
    np.testing.assert_array_equal(ds.x_train, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ref["y"])
    np.testing.assert_array_equal(ds.x_test, ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])
    for part in (ds.y_train, ds.y_test):
        assert set(np.unique(part)) == set(range(10))
    monkeypatch.setattr(bundled, "_generate_mnist1d", lambda a: pytest.fail("regenerated"))
    assert D.fingerprint(load_dataset("mnist1d_60k")) == D.fingerprint(ds)
