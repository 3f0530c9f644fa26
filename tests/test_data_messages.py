"""Messages for hostile or mistaken user files: what the file really is, labels, plain values."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fnbackprop.data import DataError, Dataset, load_dataset

REGRESSION_HINT = "pass task='regression' (command line: --task regression)"


def _raises(match_all, path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "np." + "float64(" not in msg and "np.int64(" not in msg, msg
    for part in match_all:
        assert part in msg, (part, msg)
    return msg


def _npz(tmp_path, name="data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _csv(tmp_path, text, name="data.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- values printed as written ----------------------------------------------------------------
def test_single_value_is_printed_plainly(tmp_path):
    _raises(["single value 1.0:"], _npz(tmp_path, "f.npz", x=np.arange(6.0), y=np.ones(6)))
    _raises(["single value 1:"], _npz(tmp_path, "i.npz", x=np.arange(6.0), y=np.ones(6, int)))
    _raises(["single value 1:"], _csv(tmp_path, "a,y\n" + "1,1\n" * 4))
    _raises(["single value 2.5:"], _csv(tmp_path, "a,y\n" + "1,2.5\n" * 4, "b.csv"))


# --- what the path really is ------------------------------------------------------------------
def test_random_bytes_are_not_a_valid_npz(tmp_path):
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(300))
    msg = _raises(["noise.npz is not a valid .npz (zip) file", "np.savez"], str(noise))
    assert "pickle" not in msg
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _raises(["not a valid .npz (zip) file: it is empty"], str(empty))
    npy = tmp_path / "one.npz"
    with open(npy, "wb") as f:
        np.save(f, np.ones(3))
    _raises(["one.npz is a single .npy array, not a .npz archive"], str(npy))


def test_damaged_compressed_npz_is_a_data_error(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=np.arange(300.0), y=np.arange(300) % 2)
    raw = bytearray(path.read_bytes())
    raw[60:90] = bytes(30)
    path.write_bytes(bytes(raw))
    _raises(["cannot read", "c.npz"], str(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("ext", [".npz", ".csv"])
def test_fifo_is_refused_without_blocking(tmp_path, ext):
    fifo = str(tmp_path / f"pipe{ext}")
    os.mkfifo(fifo)
    result = []

    def load():
        try:
            load_dataset(fifo)
        except DataError as exc:
            result.append(str(exc))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "load_dataset blocked on a FIFO"
    assert result and result[0] == f"{fifo} is a named pipe (FIFO), not a regular {ext} file"


def test_symlink_loop_and_broken_link(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.symlink_to(b)
    b.symlink_to(a)
    msg = _raises(["a.csv is a symbolic link loop"], str(a))
    assert "not found" not in msg
    broken = tmp_path / "broken.npz"
    broken.symlink_to(tmp_path / "gone.npz")
    _raises(["broken.npz is a broken symbolic link", "gone.npz does not exist"], str(broken))
    real = _npz(tmp_path, x=np.arange(10.0), y=np.arange(10) % 2)
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    assert load_dataset(str(link)).num_classes == 2    # a link to a regular file is fine


# --- labels -----------------------------------------------------------------------------------
def test_labels_that_are_codes_are_refused_with_the_fix(tmp_path):
    y = np.array([3, 7, 9] * 10)
    path = _npz(tmp_path, x=np.arange(30.0), y=y)
    _raises(["class labels 3, 7, 9 are not 0..K-1", "K = max label + 1 = 10",
             "classes 0, 1, 2, 4, 5, 6, 8 would have no examples", "remap the labels to 0..2",
             "np.unique(y, return_inverse=True)[1]", REGRESSION_HINT], path)
    _raises(["class labels 3, 7, 9"], path, task="classification")
    fixed = _npz(tmp_path, "fixed.npz", x=np.arange(30.0), y=np.unique(y, return_inverse=True)[1])
    assert load_dataset(fixed).num_classes == 3
    assert load_dataset(path, task="regression").task == "regression"


def test_labels_from_one_and_gaps_are_refused(tmp_path):
    one_based = _npz(tmp_path, x=np.arange(30.0), y=np.array([1, 2, 3] * 10))
    _raises(["class labels 1, 2, 3 are not 0..K-1", "class 0 would have no examples",
             "y - 1"], one_based)
    gap = _csv(tmp_path, "a,y\n" + "".join(f"{i},{(0, 1, 2, 4)[i % 4]}\n" for i in range(40)))
    msg = _raises(["class labels 0, 1, 2, 4", "class 3 would have no examples"], gap)
    assert "y - 1" not in msg
    many = _npz(tmp_path, "many.npz", x=np.arange(60.0), y=np.array([0, 50, 99] * 20))
    _raises(["classes 1, 2, 3, 4, 5, 6, 7, 8, … (97 in all) would have"], many)


def test_a_dataset_built_directly_may_state_unused_classes():
    x = np.ones((4, 2), np.float32)
    y = np.array([0, 1, 0, 3], np.int32)
    assert Dataset("t", "classification", x, y, x, y, 5, "noise").num_outputs == 5


def test_label_messages_name_the_command_line_flag(tmp_path):
    x = np.arange(30.0)
    _raises(["class label 1000000000.0 at y[2] is out of range", REGRESSION_HINT],
            _npz(tmp_path, "big.npz", x=x, y=np.array([0, 1, 1e9] * 10)))
    _raises(["negative class label -2 at y[2]", REGRESSION_HINT],
            _npz(tmp_path, "neg.npz", x=x, y=np.array([0, 1, -2] * 10)))
    _raises(["y value 0.5 at y[1] is not an integer class label"],
            _npz(tmp_path, "f.npz", x=x, y=np.array([0, 0.5, 1] * 10)), task="classification")


def test_string_labels_are_data_errors_naming_array_and_value(tmp_path):
    words = np.array(["cat", "dog"] * 5)
    msg = _raises(["array y has non-numeric dtype <U3", "first value 'cat'",
                   "np.unique(y, return_inverse=True)"],
                  _npz(tmp_path, x=np.arange(10.0), y=words))
    objects = np.array(["cat", 1] * 5, dtype=object)
    _raises(["array y has dtype object", "not loaded"],
            _npz(tmp_path, "o.npz", x=np.arange(10.0), y=objects))
    text = "a,label\n1,0\n2,cat\n3,1\n"
    _raises(["non-numeric value 'cat' at line 3 (data row 2), column 'label'",
             "the target must be numeric"], _csv(tmp_path, text))
    assert issubclass(DataError, ValueError) and msg
