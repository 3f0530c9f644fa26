"""fnbackprop.data.fingerprint: same data, same hash; any change a run would see, another hash."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from fnbackprop.data import Dataset, fingerprint, load_dataset, split_validation


def _dataset(**changes) -> Dataset:
    rng = np.random.default_rng(0)
    fields = dict(
        name="d", task="classification",
        x_train=rng.normal(size=(20, 3)).astype(np.float32),
        y_train=np.arange(20, dtype=np.int32) % 3,
        x_test=rng.normal(size=(6, 3)).astype(np.float32),
        y_test=np.arange(6, dtype=np.int32) % 3,
        num_classes=3, augment_kind="noise", image_shape=None,
    )
    fields.update(changes)
    return Dataset(**fields)


def _changed(a: np.ndarray, index, value) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


def test_same_data_same_fingerprint(tmp_path):
    ds = _dataset()
    h = fingerprint(ds)
    assert len(h) == 64 and int(h, 16) >= 0
    assert fingerprint(_dataset()) == h
    assert fingerprint(dataclasses.replace(ds, name="moved.npz")) == h   # the name is not hashed
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    a, b = load_dataset(tmp_path / "a.npz"), load_dataset(tmp_path / "b.npz")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(load_dataset("xor")) == fingerprint(load_dataset("xor", seed=7))


def test_any_change_a_run_would_see_changes_the_fingerprint():
    ds = _dataset()
    variants = {
        "value": dict(x_train=_changed(ds.x_train, (4, 1), ds.x_train[4, 1] + 1e-6)),
        "test value": dict(x_test=_changed(ds.x_test, (5, 2), 0.0)),
        "label": dict(y_train=_changed(ds.y_train, 7, (ds.y_train[7] + 1) % 3)),
        "test label": dict(y_test=_changed(ds.y_test, 0, 2)),
        "row order": dict(x_train=ds.x_train[::-1].copy(), y_train=ds.y_train[::-1].copy()),
        "task and dtype": dict(task="regression", num_classes=None,
                      y_train=ds.y_train.astype(np.float32)[:, None],
                      y_test=ds.y_test.astype(np.float32)[:, None]),
        "classes": dict(num_classes=4),
        "image shape": dict(image_shape=(3,)),
        "train/test boundary": dict(x_train=ds.x_train[:-1], y_train=ds.y_train[:-1],
                                    x_test=np.concatenate([ds.x_train[-1:], ds.x_test]),
                                    y_test=np.concatenate([ds.y_train[-1:], ds.y_test])),
    }
    hashes = {what: fingerprint(_dataset(**change)) for what, change in variants.items()}
    hashes["original"] = fingerprint(ds)
    assert len(set(hashes.values())) == len(hashes), hashes


def test_fingerprint_sees_the_dtype_of_equal_values():
    a = _dataset(task="regression", num_classes=None,
                 y_train=np.zeros((20, 1), np.float32), y_test=np.ones((6, 1), np.float32))
    same_bits = copy.copy(a)    # Dataset itself refuses int32 targets: go around its check
    object.__setattr__(same_bits, "y_train", a.y_train.view(np.int32))
    assert same_bits.y_train.tobytes() == a.y_train.tobytes()
    assert fingerprint(same_bits) != fingerprint(a)


def test_fingerprint_of_a_split_differs_and_rejects_non_datasets():
    ds = load_dataset("xor")
    assert fingerprint(split_validation(ds, 0.1, seed=0)[0]) != fingerprint(ds)
    with pytest.raises(TypeError, match="Dataset"):
        fingerprint({"x_train": ds.x_train})
