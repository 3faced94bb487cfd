#!/usr/bin/env python
"""Build the Fashion-MNIST data shipped with timm_mltp (or the full set for benchmarks).

    python scripts/make_fashion_mnist.py                    # stratified subset -> timm_mltp/data/fashion_mnist_small/
    python scripts/make_fashion_mnist.py --full OUT_DIR     # full 60k/10k DatasetDict via save_to_disk

Reads the original IDX gzip files (Zalando Research, MIT license) from --source, else from
../shared/data/fashion-mnist/ beside the checkout (where CI and other machines lay them), else
/usr/share/datasets/fashion-mnist/ (Debian dataset-fashion-mnist).
"""
import argparse
import gzip
import hashlib
import io
import os
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import datasets  # noqa: E402

datasets.disable_progress_bars()

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = [REPO_ROOT.parent / "shared" / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
SUBSET_DIR = REPO_ROOT / "timm_mltp" / "data" / "fashion_mnist_small"
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})


def find_source(source):
    candidates = [Path(source)] if source else DEFAULT_SOURCES
    for d in candidates:
        if all((d / f).is_file() for pair in FILES.values() for f in pair):
            return d
    sys.exit(f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}; "
             f"expected {', '.join(f for pair in FILES.values() for f in pair)}. Pass --source DIR.")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f"{path}: unexpected IDX magic {magic:#x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(src, split):
    images_file, labels_file = FILES[split]
    images, labels = read_idx(src / images_file), read_idx(src / labels_file)
    assert len(images) == len(labels), (split, images.shape, labels.shape)
    return images, labels


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def to_dataset(images, labels):
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(a), "path": None} for a in images], "label": labels.tolist()},
        features=FEATURES,
    )


def stratified_indices(labels, per_class, rng):
    picked = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(picked))  # keep source order, which is already class-mixed


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


README = """\
---
license: mit
pretty_name: Fashion-MNIST (small stratified subset)
task_categories:
- image-classification
size_categories:
- 10K<n<100K
configs:
- config_name: default
  data_files:
  - split: train
    path: train.parquet
  - split: test
    path: test.parquet
---

# Fashion-MNIST, small stratified subset

{n_train:,} training and {n_test:,} test images ({train_pc:,} / {test_pc:,} per class) drawn from
[Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) by Zalando Research
(Han Xiao, Kashif Rasul, Roland Vollgraf, arXiv:1708.07747).
License: MIT, Copyright (c) 2017 Zalando SE. The images are unchanged 28x28 grayscale,
stored as PNG bytes.

Files: `train.parquet`, `test.parquet`, written with Hugging Face `datasets`
(features: `image` = `datasets.Image()`, `label` = `ClassLabel`). Load with

    datasets.load_dataset("parquet", data_files={{"train": "train.parquet", "test": "test.parquet"}})

or `timm_mltp.data.load_image_dataset()`.

Labels: {labels}.

## How the subset was drawn

From the original training set (60,000 images) {train_pc:,} images of each class were drawn
without replacement, and likewise {test_pc:,} of each class from the original test set (10,000
images), with `numpy.random.default_rng({seed})` (one `rng.choice` per class, classes 0..9, train
first then test). The rows keep the order of the source files.

Source files (the original IDX gzip files, e.g. Debian package `dataset-fashion-mnist`):

| file | sha256 |
| --- | --- |
{hashes}

## Regenerate

    python scripts/make_fashion_mnist.py --subset --seed {seed} --train-per-class {train_pc} --test-per-class {test_pc}
"""


def write_subset(src, out_dir, seed, train_pc, test_pc):
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, per_class in (("train", train_pc), ("test", test_pc)):
        images, labels = load_split(src, split)
        idx = stratified_indices(labels, per_class, rng)
        ds = to_dataset(images[idx], labels[idx])
        ds.to_parquet(str(out_dir / f"{split}.parquet"))
        sizes[split] = len(ds)
    hashes = "\n".join(f"| {f} | {sha256(src / f)} |" for pair in FILES.values() for f in pair)
    labels = ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES))
    (out_dir / "README.md").write_text(README.format(
        n_train=sizes["train"], n_test=sizes["test"], train_pc=train_pc, test_pc=test_pc,
        seed=seed, hashes=hashes, labels=labels))
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {out_dir} ({sizes['train']} train, {sizes['test']} test, {total / 1e6:.2f} MB)")


def write_full(src, out_dir):
    dd = datasets.DatasetDict({split: to_dataset(*load_split(src, split)) for split in FILES})
    dd.save_to_disk(str(out_dir))
    print(f"wrote {out_dir}: {dd}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--subset", action="store_true", help="write the shipped stratified subset (default)")
    mode.add_argument("--full", metavar="OUT_DIR", help="write the full dataset with DatasetDict.save_to_disk")
    p.add_argument("--source", metavar="DIR", help="folder with the four Fashion-MNIST *-ubyte.gz files")
    p.add_argument("--out", metavar="DIR", default=str(SUBSET_DIR), help="subset output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    args = p.parse_args(argv)

    src = find_source(args.source)
    if args.full:
        write_full(src, Path(args.full))
    else:
        write_subset(src, Path(args.out), args.seed, args.train_per_class, args.test_per_class)


if __name__ == "__main__":
    main()
