"""`kdkit shard hdf5`: one HDF5 file holding an image dataset and an (N,) integer label dataset.

Images are either uint8 pixel arrays, (N,H,W) or (N,H,W,C), which the writer encodes as JPEG, or N
encoded images stored as variable-length bytes (vlen uint8, vlen bytes strings, or opaque np.void),
which pass through untouched when they are JPEG. Sample i gets the key f"{split}-{i:08d}": derived
from the index alone, so it is stable across runs and needs nothing else from the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdkit.errors import BadImage, KdkitError
from kdkit.shards.contract import ClassInfo
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit

# Open handles per process. Workers are spawned processes, so each opens the file once, lazily, on its
# first image and keeps it: reopening per image would re-read HDF5 metadata every time. (An h5py handle
# must never cross a fork or a pickle, which is why refs carry the path and not the handle.)
_FILES: dict = {}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise KdkitError("kdkit shard hdf5 needs h5py: pip install h5py") from None
    return h5py


def _open(path: str):
    f = _FILES.get(path)
    if f is None or not f.id.valid:
        f = _FILES[path] = _h5py().File(path, "r")
    return f


def _forget(path: str) -> None:
    """Drop a cached handle: the file may have been rewritten since it was opened."""
    for k in [k for k in _PIXELS if k[0] == path]:
        del _PIXELS[k]
    f = _FILES.pop(path, None)
    if f is not None and f.id.valid:
        f.close()


def _layout(ds) -> str | None:
    """"pixels" (uint8 arrays), "encoded" (one byte string per image) or None (not usable)."""
    h5py = _h5py()
    if ds.dtype == np.uint8 and (ds.ndim == 3 or (ds.ndim == 4 and ds.shape[-1] in (1, 3, 4))):
        return "pixels"
    vlen = h5py.check_vlen_dtype(ds.dtype)  # element type of a variable-length dtype, else None
    opaque = ds.dtype.kind == "V" and ds.dtype.names is None  # np.void blobs (not a compound type)
    if ds.ndim == 1 and (opaque or vlen is bytes or vlen is str or (vlen is not None and vlen == np.uint8)):
        return "encoded"
    return None


# A pixel dataset up to this size is read into memory once per worker: h5py costs ~3 ms per single-row
# read (dataset lookup and selection), 30x the JPEG encode of an MNIST digit; rows in shuffled order
# defeat its chunk cache. Larger ones are read row by row.
IN_MEMORY_BYTES = 512 * 2**20
_PIXELS: dict = {}


def _pixels(path: str, key: str):
    """The (path, key) pixel dataset: in memory where it is small enough, else the h5py dataset."""
    if (path, key) not in _PIXELS:
        ds = _open(path)[key]
        _PIXELS[path, key] = ds[()] if ds.ndim > 1 and ds.size * ds.dtype.itemsize <= IN_MEMORY_BYTES else ds
    return _PIXELS[path, key]


def read_image(ref: tuple) -> bytes | np.ndarray:
    """Pixels (uint8 ndarray) or encoded bytes of image ref = ("hdf5", path, dataset, index)."""
    _, path, key, i = ref
    ds = _pixels(path, key)
    item = ds[i]
    if ds.ndim > 1:
        return np.ascontiguousarray(item)
    if isinstance(item, bytes):
        return item
    if isinstance(item, (np.ndarray, np.void)):  # vlen uint8 or opaque: the raw bytes
        return item.tobytes()
    raise BadImage(f"unexpected HDF5 element type {type(item).__name__}")


def _dataset(f, path: Path, key: str):
    h5py = _h5py()
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        names: list[str] = []
        f.visititems(lambda name, o: names.append(name) if isinstance(o, h5py.Dataset) else None)
        what = "is a group, not a dataset" if obj is not None else "not found"
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise KdkitError(f"{path}: dataset '{key}' {what}; datasets in the file: {shown or 'none'}")
    return obj


def _names(f, path: Path, class_names: str) -> list[str]:
    """Class names from a dataset in the file, else from a text file (one name per line)."""
    if class_names in f:
        raw = _dataset(f, path, class_names)[()]
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in np.ravel(raw)]
    text = Path(class_names)
    if not text.is_file():
        raise KdkitError(f"--class-names {class_names}: neither a dataset in {path} nor a text file")
    return [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]


def list_hdf5(path: Path | str, images_key: str = "images", labels_key: str = "labels", split: str = "train",
              class_names: str | None = None) -> SourceDataset:
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"{path}: HDF5 file does not exist; check the path")
    if not h5py.is_hdf5(str(path)):
        raise KdkitError(f"{path}: not an HDF5 file")
    _forget(str(path))
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # unreadable, or locked by a process still writing it
        raise KdkitError(f"{path}: cannot open HDF5 file: {e}") from None
    with f:
        images = _dataset(f, path, images_key)
        layout = _layout(images)
        if layout is None:
            raise KdkitError(f"{path}: dataset '{images_key}' has dtype {images.dtype} and shape {images.shape}; "
                             "expected uint8 pixels (N,H,W) or (N,H,W,C) with C in 1/3/4, or (N,) variable-length bytes")
        labels_ds = _dataset(f, path, labels_key)
        labels = labels_ds[()]
        if labels.ndim == 2 and labels.shape[1] == 1:  # (N,1) as some exporters write it
            labels = labels[:, 0]
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise KdkitError(f"{path}: dataset '{labels_key}' has dtype {labels.dtype} and shape {labels.shape}; "
                             "expected (N,) integers")
        n = images.shape[0]
        if len(labels) != n:
            raise KdkitError(f"{path}: {n} images in '{images_key}' but {len(labels)} labels in '{labels_key}'; "
                             "they must match one to one")
        names = _names(f, path, class_names) if class_names else None
    if n and labels.min() < 0:
        i = int(np.argmax(labels < 0))
        raise KdkitError(f"{path}: label {int(labels[i])} of image {i} is negative; labels must be class indices 0..C-1")
    if names is not None and n and labels.max() >= len(names):
        i = int(np.argmax(labels >= len(names)))
        raise KdkitError(f"{path}: label {int(labels[i])} of image {i} has no class name "
                         f"({len(names)} names in {class_names})")
    classes = [ClassInfo(i, c, c) for i, c in enumerate(names)] if names is not None else \
        [ClassInfo(i, str(i)) for i in range(int(labels.max()) + 1 if n else 0)]
    samples = [SourceSample(f"{split}-{i:08d}", int(label), ("hdf5", str(path), images_key, i),
                            f"{path}[{images_key}][{i}]") for i, label in enumerate(labels.tolist())]
    return SourceDataset("hdf5", str(path), classes, [SourceSplit(split, samples)],
                         info={"images_key": images_key, "labels_key": labels_key, "layout": layout,
                               "class_names": class_names or "label values"})
