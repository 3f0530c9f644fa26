"""Tests of fnbackprop.data: bundled and user data, errors, splits, standardisation."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from fnbackprop import data as D
from fnbackprop.data import DataError, Dataset, bundled, load_dataset

SKLEARN_SETS = ("digits", "breast_cancer", "diabetes")


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A private cache folder; mnist1d is generated once into it for the whole module."""
    folder = tmp_path_factory.mktemp("fbcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FNBACKPROP_CACHE_DIR", str(folder))
        np.random.seed(99)
        random.seed(99)
        before_np, before_py = np.random.get_state(), random.getstate()
        ds = load_dataset("mnist1d")
        after_np, after_py = np.random.get_state(), random.getstate()
        yield folder, ds, (before_np, before_py, after_np, after_py)


@pytest.fixture
def cache_env(mnist1d_cache, monkeypatch):
    folder, ds, _ = mnist1d_cache
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(folder))
    return folder, ds


def _fake_mnist1d(args):
    """A stand-in for the generator: the shapes, dtypes and split its ``args`` ask for."""
    n = args["num_samples"]
    n_train = int(n * args["train_split"])
    x = np.random.default_rng(0).normal(size=(n, args["final_seq_length"])).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _load(name, mnist1d_cache, tmp_path, monkeypatch):
    """The dataset; mnist1d_60k (slow to generate) comes from the fake generator."""
    if name == "mnist1d":
        return mnist1d_cache[1]
    if name == "mnist1d_60k":
        monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(bundled, "_generate_mnist1d", _fake_mnist1d)
    return load_dataset(name)


def _raises(match_all, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in match_all:
        assert part in msg, (part, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# Bundled datasets


@pytest.mark.parametrize("name", D.DATASETS)
def test_bundled_shapes_dtypes_classes(name, mnist1d_cache, tmp_path, monkeypatch):
    ds = _load(name, mnist1d_cache, tmp_path, monkeypatch)
    info = D.DATASET_INFO[name]
    assert isinstance(ds, Dataset) and ds.name == name and ds.task == info.task
    assert ds.x_train.shape == (info.n_train, info.n_features)
    assert ds.x_test.shape == (info.n_test, info.n_features)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()
    assert ds.augment_kind == info.augment_kind and ds.image_shape == info.image_shape
    assert ds.num_classes == info.num_classes
    if ds.task == "classification":
        assert ds.y_train.shape == (info.n_train,) and ds.y_train.dtype == np.int32
        assert ds.y_test.shape == (info.n_test,) and ds.y_test.dtype == np.int32
        # every class occurs in both parts
        assert set(np.unique(ds.y_train)) == set(range(ds.num_classes))
        assert set(np.unique(ds.y_test)) == set(range(ds.num_classes))
        assert ds.num_outputs == ds.num_classes
    else:
        assert ds.y_train.shape == (info.n_train, 1) and ds.y_train.dtype == np.float32
        assert ds.y_test.shape == (info.n_test, 1) and ds.y_test.dtype == np.float32
        assert ds.num_outputs == 1
    assert not ds.x_train.flags.writeable and not ds.y_test.flags.writeable


@pytest.mark.parametrize("name", ("digits", "diabetes", "xor", "spirals"))
def test_bundled_split_is_fixed_and_ignores_seed(name):
    a = load_dataset(name, seed=0)
    b = load_dataset(name, seed=12345)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), field


@pytest.mark.parametrize("name", SKLEARN_SETS)
def test_sklearn_split_partitions_the_original_data(name):
    import sklearn.datasets

    kwargs = {"scaled": False} if name == "diabetes" else {}
    x, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True, **kwargs)
    ds = load_dataset(name)
    both = np.concatenate([ds.x_train, ds.x_test])
    assert len(both) == len(x)
    # same rows, each exactly once (sort rows lexicographically to compare as multisets)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(both), key(x.astype(np.float32)))
    assert abs(len(ds.y_test) - 0.2 * len(y)) <= 1
    if ds.task == "classification":  # stratified: class shares agree within one example
        for c in range(ds.num_classes):
            expected = np.mean(y == c) * len(ds.y_test)
            assert abs(np.sum(ds.y_test == c) - expected) <= 1.0


def test_mnist1d_is_the_generators_own_split(mnist1d_cache):
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    ref = make_dataset(get_dataset_args())
    np.random.set_state(state)
    ds = mnist1d_cache[1]
    np.testing.assert_array_equal(ds.x_train, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ref["y"])
    np.testing.assert_array_equal(ds.x_test, ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


def test_mnist1d_generation_restores_global_rng(mnist1d_cache):
    before_np, before_py, after_np, after_py = mnist1d_cache[2]
    assert before_py == after_py
    assert before_np[0] == after_np[0] and before_np[2:] == after_np[2:]
    np.testing.assert_array_equal(before_np[1], after_np[1])


def test_mnist1d_second_load_uses_cache(cache_env, monkeypatch):
    folder, first = cache_env
    files = os.listdir(folder)
    assert len(files) == 1 and files[0].startswith("mnist1d-") and files[0].endswith(".npz")

    def no_generation(args):
        raise AssertionError("mnist1d regenerated although it is cached")

    monkeypatch.setattr(bundled, "_generate_mnist1d", no_generation)
    second = load_dataset("mnist1d", seed=3)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(first, field).tobytes() == getattr(second, field).tobytes(), field


def test_mnist1d_damaged_cache_is_regenerated_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bundled, "_generate_mnist1d", _fake_mnist1d)
    key = bundled._mnist1d_key(D.MNIST1D_ARGS["mnist1d"])
    path = tmp_path / f"mnist1d-{key}.npz"
    path.write_bytes(b"half a zip file")
    ds = load_dataset("mnist1d")
    np.testing.assert_array_equal(ds.x_train, _fake_mnist1d(D.MNIST1D_ARGS["mnist1d"])[0])
    assert os.listdir(tmp_path) == [path.name]  # no temporary files left behind
    monkeypatch.setattr(bundled, "_generate_mnist1d", lambda args: pytest.fail("regenerated"))
    again = load_dataset("mnist1d")
    assert again.x_test.tobytes() == ds.x_test.tobytes()


def test_mnist1d_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(bundled, "_generate_mnist1d", _fake_mnist1d)
    ds = load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 40)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FNBACKPROP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.cache_dir() == os.path.join(str(tmp_path), "fnbackprop")
    monkeypatch.setenv("FNBACKPROP_CACHE_DIR", "/somewhere/else")
    assert D.cache_dir() == "/somewhere/else"


def test_synthetic_labels_follow_their_rule():
    xor = load_dataset("xor")
    for x, y in ((xor.x_train, xor.y_train), (xor.x_test, xor.y_test)):
        np.testing.assert_array_equal(y, (x[:, 0] > 0) != (x[:, 1] > 0))
    sp = load_dataset("spirals")
    assert abs(np.mean(sp.y_train) - 0.5) < 0.01
    r = np.linalg.norm(sp.x_train, axis=1)
    assert r.max() < 1.2


def test_dataset_info_is_read_only():
    with pytest.raises(TypeError):
        D.DATASET_INFO["digits"] = None  # type: ignore[index]
    assert set(D.DATASET_INFO) == set(D.DATASETS)


# ---------------------------------------------------------------------------------------------
# User files


def _npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _rows_by_first_column(ds):
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    order = np.argsort(x[:, 0])
    return x[order], y[order]


def test_npz_classification_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    x[:, 0] = np.arange(50)  # a row id, to match rows after the split
    y = np.arange(50) % 3
    path = _npz(tmp_path, x=x, y=y)
    ds = load_dataset(path)
    assert ds.task == "classification" and ds.num_classes == 3 and ds.augment_kind == "noise"
    assert ds.x_train.shape == (40, 3) and ds.x_test.shape == (10, 3)
    assert ds.y_train.dtype == np.int32
    xs, ys = _rows_by_first_column(ds)
    np.testing.assert_array_equal(xs, x.astype(np.float32))
    np.testing.assert_array_equal(ys, y)
    # seeded split: same seed same split, another seed another split
    assert load_dataset(path).x_test.tobytes() == ds.x_test.tobytes()
    assert load_dataset(path, seed=5).x_test.tobytes() != ds.x_test.tobytes()


def test_npz_regression_and_shapes(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 2, 3))
    y = rng.normal(size=(30, 1))
    ds = load_dataset(_npz(tmp_path, x=x, y=y))
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.x_train.shape == (24, 6) and ds.y_train.shape == (24, 1)
    assert ds.image_shape == (2, 3)
    # 1-D x is one feature; integer-valued regression targets with many values stay regression
    ds1 = load_dataset(_npz(tmp_path, "b.npz", x=np.arange(20.0), y=np.arange(20) * 7))
    assert ds1.x_train.shape == (16, 1) and ds1.task == "regression"


def test_task_override(tmp_path):
    path = _npz(tmp_path, x=np.arange(40.0)[:, None], y=np.arange(40) % 4)
    assert load_dataset(path).task == "classification"
    reg = load_dataset(path, task="regression")
    assert reg.task == "regression" and reg.y_train.shape == (32, 1)
    frac = _npz(tmp_path, "f.npz", x=np.arange(40.0)[:, None], y=np.linspace(0, 1, 40))
    _raises(["not an integer class label", "y["], load_dataset, frac, task="classification")
    with pytest.raises(ValueError, match="task"):
        load_dataset(path, task="clustering")
    _raises(["classification dataset"], load_dataset, "digits", task="regression")


def test_csv_round_trip_last_column_and_named_target(tmp_path):
    lines = ["id,b,label,c"] + [f"{i},{i * 0.5},{i % 2},{-i}" for i in range(20)]
    path = _csv(tmp_path, "\n".join(lines) + "\n\n")
    ds = load_dataset(path)  # target = last column "c": negative whole numbers, 20 distinct
    assert ds.task == "regression" and ds.x_train.shape == (16, 3)
    xs, ys = _rows_by_first_column(ds)
    np.testing.assert_array_equal(ys[:, 0], -np.arange(20))
    named = load_dataset(path, target="label")
    assert named.task == "classification" and named.num_classes == 2
    xs, ys = _rows_by_first_column(named)
    np.testing.assert_array_equal(xs[:, 0], np.arange(20))
    np.testing.assert_array_equal(xs[:, 2], -np.arange(20))  # feature columns: id, b, c
    np.testing.assert_array_equal(ys, np.arange(20) % 2)


def test_csv_quoted_cells_and_bom(tmp_path):
    text = "\ufeff\"f 1\",\"y\"\n" + "".join(f"\" {i}.5 \",{i % 2}\n" for i in range(10))
    ds = load_dataset(_csv(tmp_path, text))
    assert ds.task == "classification" and ds.x_train.shape == (8, 1)


# ---------------------------------------------------------------------------------------------
# Errors


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_unknown_dataset_lists_choices(tmp_path):
    msg = _raises(["unknown dataset 'digitz'"], load_dataset, "digitz")
    for name in D.DATASETS:
        assert name in msg
    other = tmp_path / "data.txt"
    other.write_text("1,2\n")
    _raises(["unsupported file type '.txt'"], load_dataset, str(other))


def test_missing_and_unreadable_files(tmp_path):
    _raises(["file not found", "nope.csv"], load_dataset, str(tmp_path / "nope.csv"))
    _raises(["file not found"], load_dataset, str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"\x00\x01 not a zip")
    _raises(["not a valid .npz (zip) file", "bad.npz"], load_dataset, str(bad))
    badcsv = tmp_path / "bad.csv"
    badcsv.write_bytes(b"a,b\n\xff\xfe,1\n")
    _raises(["cannot read", "bad.csv"], load_dataset, str(badcsv))
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    _raises(["is a directory"], load_dataset, str(folder))


def test_non_finite_values_name_row_and_column(tmp_path):
    x = np.ones((10, 3))
    x[3, 1] = np.nan
    _raises(["x", "nan", "x[3, 1]"], load_dataset, _npz(tmp_path, x=x, y=np.arange(10) % 2))
    y = np.linspace(0, 1, 10)
    y[7] = np.inf
    _raises(["y", "inf", "y[7]"], load_dataset, _npz(tmp_path, "b.npz", x=np.ones((10, 2)), y=y))
    text = "a,b,y\n" + "1,2,0\n" * 3 + "1,inf,1\n" + "1,2,1\n" * 3
    _raises(["inf", "line 5", "data row 4", "column 'b'"], load_dataset, _csv(tmp_path, text))
    big = np.ones((10, 2))
    big[2, 0] = 1e300
    _raises(["overflows float32", "x[2, 0]"], load_dataset,
            _npz(tmp_path, "c.npz", x=big, y=np.arange(10) % 2))


def test_label_errors(tmp_path):
    x = np.ones((20, 2))
    y = np.arange(20) % 3
    y[4] = -1
    _raises(["negative class label -1", "y[4]"], load_dataset, _npz(tmp_path, x=x, y=y))
    y = np.arange(20) % 3
    y[6] = 150
    _raises(["class label 150", "out of range", "y[6]"], load_dataset,
            _npz(tmp_path, "b.npz", x=x, y=y))
    text = "a,target\n" + "".join(f"{i},{-1 if i == 3 else i % 2}\n" for i in range(10))
    _raises(["negative class label -1", "line 5", "column 'target'"], load_dataset,
            _csv(tmp_path, text))


def test_shape_and_emptiness_errors(tmp_path):
    _raises(["length mismatch", "x has 10 rows but y has 9"], load_dataset,
            _npz(tmp_path, x=np.ones((10, 2)), y=np.arange(9)))
    _raises(["empty data"], load_dataset,
            _npz(tmp_path, "e.npz", x=np.ones((0, 2)), y=np.ones(0)))
    _raises(["no features"], load_dataset,
            _npz(tmp_path, "f.npz", x=np.ones((5, 0)), y=np.arange(5)))
    _raises(["missing array(s) y", "found: x"], load_dataset,
            _npz(tmp_path, "g.npz", x=np.ones((5, 2))))
    _raises(["y must have shape (N,) or (N, 1)"], load_dataset,
            _npz(tmp_path, "h.npz", x=np.ones((5, 2)), y=np.ones((5, 2))))
    _raises(["non-numeric dtype"], load_dataset,
            _npz(tmp_path, "i.npz", x=np.array([["a"], ["b"]]), y=np.arange(2)))
    _raises(["single value"], load_dataset,
            _npz(tmp_path, "j.npz", x=np.arange(6.0), y=np.zeros(6)))
    _raises(["empty file"], load_dataset, _csv(tmp_path, "", "k.csv"))
    _raises(["empty data", "no rows"], load_dataset, _csv(tmp_path, "a,b\n", "l.csv"))
    _raises(["line 1 looks like data"], load_dataset, _csv(tmp_path, "1,2\n3,4\n", "m.csv"))
    _raises(["line 3 has 2 fields but the header has 3"], load_dataset,
            _csv(tmp_path, "a,b,y\n1,2,0\n1,2\n", "n.csv"))


def test_csv_non_numeric_cell_and_unknown_target(tmp_path):
    path = _csv(tmp_path, "a,b,y\n1,2,0\n3,abc,1\n5,6,0\n")
    _raises(["non-numeric value 'abc'", "line 3", "data row 2", "column 'b'"], load_dataset, path)
    ok = _csv(tmp_path, "a,b,y\n" + "1,2,0\n2,3,1\n" * 3, "ok.csv")
    _raises(["no target column 'zzz'", "columns are a, b, y"], load_dataset, ok, target="zzz")
    _raises(["only applies to .csv"], load_dataset, "digits", target="y")
    empty_cell = _csv(tmp_path, "a,b,y\n1,,0\n2,3,1\n", "e.csv")
    _raises(["non-numeric value ''", "column 'b'"], load_dataset, empty_cell)


def test_bad_seed_is_value_error():
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            load_dataset("xor", seed=seed)


def test_dataset_checks_its_arrays():
    x = np.ones((4, 2), np.float32)
    y = np.array([0, 1, 0, 1], np.int32)
    Dataset("t", "classification", x, y, x, y, 2, "noise")
    with pytest.raises(DataError, match="out of range"):
        Dataset("t", "classification", x, y + 1, x, y, 2, "noise")
    with pytest.raises(DataError, match="float32"):
        Dataset("t", "classification", x.astype(np.float64), y, x, y, 2, "noise")
    with pytest.raises(DataError, match=r"\(4, 1\) float32"):
        Dataset("t", "regression", x, y, x, y, None, "noise")
    with pytest.raises(DataError, match="augment_kind"):
        Dataset("t", "classification", x, y, x, y, 2, "rotate")


# ---------------------------------------------------------------------------------------------
# Validation split and standardisation


def test_split_validation_partitions_train_stratified_and_seeded():
    ds = load_dataset("digits")
    rest, (xv, yv) = D.split_validation(ds, 0.1, seed=0)
    n = len(ds.y_train)
    assert len(yv) == round(0.1 * n) and len(rest.y_train) + len(yv) == n
    assert rest.x_test is ds.x_test
    both = np.concatenate([rest.x_train, xv])
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(both), key(ds.x_train))
    for c in range(10):
        assert abs(np.sum(yv == c) - np.mean(ds.y_train == c) * len(yv)) <= 1.0
    again = D.split_validation(ds, 0.1, seed=0)[1]
    other = D.split_validation(ds, 0.1, seed=1)[1]
    assert again[0].tobytes() == xv.tobytes() and other[0].tobytes() != xv.tobytes()
    same, none = D.split_validation(ds, 0.0, seed=0)
    assert same is ds and none is None
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="val_fraction"):
            D.split_validation(ds, bad, seed=0)


def test_split_validation_regression():
    ds = load_dataset("diabetes")
    rest, (xv, yv) = D.split_validation(ds, 0.25, seed=3)
    assert yv.shape == (round(0.25 * 354), 1) and rest.y_train.shape == (354 - len(yv), 1)


def test_standardize_uses_training_statistics_only():
    ds = load_dataset("digits")
    rest, val = D.split_validation(ds, 0.1, seed=0)
    out, val_s, stats = D.standardize(rest, val)
    x = rest.x_train.astype(np.float64)
    np.testing.assert_allclose(stats.x_mean, x.mean(0), rtol=1e-6, atol=1e-6)
    constant = x.std(0) == 0
    assert constant.any()  # digits has pixels that are always 0 in training
    np.testing.assert_array_equal(stats.x_std[constant], 1.0)
    assert np.isfinite(out.x_train).all() and np.isfinite(out.x_test).all()
    np.testing.assert_array_equal(out.x_train[:, constant], 0.0)
    np.testing.assert_allclose(out.x_train[:, ~constant].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.x_train[:, ~constant].std(0), 1.0, atol=1e-5)
    # test and validation inputs are mapped with the training statistics
    np.testing.assert_allclose(out.x_test, (ds.x_test - stats.x_mean) / stats.x_std, atol=1e-5)
    np.testing.assert_allclose(val_s[0], (val[0] - stats.x_mean) / stats.x_std, atol=1e-5)
    np.testing.assert_array_equal(out.y_train, rest.y_train)
    assert stats.y_mean is None
    # shifting the test set changes nothing in the statistics
    moved = Dataset(ds.name, ds.task, rest.x_train, rest.y_train, _frozen(rest.x_test + 100),
                    rest.y_test, 10, ds.augment_kind, ds.image_shape)
    assert D.standardize(moved)[2].x_mean.tobytes() == stats.x_mean.tobytes()


def _frozen(a):
    return np.asarray(a, np.float32)


def test_standardize_regression_targets_and_r2_invariance():
    ds = load_dataset("diabetes")
    out, _, stats = D.standardize(ds)
    assert stats.y_mean.shape == stats.y_std.shape == (1,)
    np.testing.assert_allclose(out.y_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.y_train.std(), 1.0, atol=1e-5)
    np.testing.assert_allclose(D.unstandardize_targets(out.y_test, stats), ds.y_test, rtol=1e-5)

    def r2(y, p):
        y, p = y.astype(np.float64), p.astype(np.float64)
        return 1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2)

    pred = out.y_test * 0.8 + 0.1  # any prediction in standardised units
    assert r2(out.y_test, pred) == pytest.approx(
        r2(ds.y_test, D.unstandardize_targets(pred, stats)), rel=1e-5)
    with pytest.raises(ValueError):
        D.unstandardize_targets(out.y_test, D.standardize(load_dataset("xor"))[2])
