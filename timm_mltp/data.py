"""Image classification data for the MLTP recipe: Hugging Face `datasets` in, timm transforms on top.

    ds = load_image_dataset()                       # the shipped Fashion-MNIST subset
    tf = create_transforms(model, img_size=32, scale=(0.8, 1.0))
    train = apply_transforms(ds.train, tf, ds.image_column, ds.label_column)
    loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate_image_batch)

Streamed data (timm's `hfids/NAME_OR_PATH` and `wds/SHARDS`) loads as `datasets.IterableDataset`s; `StreamedSplit`
turns one process's part of such a split into an epoch of loader batches that a resumed run reproduces exactly.
"""
import io
import itertools
import logging
import os
import random
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import datasets
import numpy as np
import torch
from PIL import Image

from timm_mltp.errors import MLTPConfigError

__all__ = [
    "DEFAULT_DATASET", "ImageDataset", "load_image_dataset", "create_transforms",
    "apply_transforms", "collate_image_batch", "convert_image", "SeededAugmentation", "SkipUnreadable",
    "UnreadableData", "check_unreadable_share", "mix_within_tasks", "StreamedSplit", "is_streamed", "image_transform",
]

_logger = logging.getLogger("timm_mltp")

# Shipped with the package: pyproject must list `timm_mltp/data/**` as package data so that this
# folder also exists in non-editable installs (and in the wheel).
DEFAULT_DATASET = Path(__file__).resolve().parent / "data" / "fashion_mnist_small"

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class", "target", "cls")   # cls: webdataset
EVAL_SPLITS = ("validation", "test", "val")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# timm's dataset types (timm.data.create_dataset): hfds/ is read map-style, these two streamed, the rest refused
STREAMED_TYPES = ("hfids", "wds")
TIMM_DATASET_TYPES = ("torch", "tfds")
# huggingface_hub's repo id shape: optional "owner/" then a name.
HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]{1,96}$")
# List/LargeList are new in datasets 4 (Sequence before); getattr keeps older versions working.
_ARRAY_FEATURES = tuple(getattr(datasets, n) for n in ("Sequence", "List", "LargeList", "Array2D", "Array3D")
                        if isinstance(getattr(datasets, n, None), type))


@dataclass
class ImageDataset:
    train: Union[datasets.Dataset, datasets.IterableDataset]   # IterableDataset: streamed (hfids/, wds/)
    eval: Optional[Union[datasets.Dataset, datasets.IterableDataset]]  # None: the source has no eval split
    image_column: str
    label_column: str
    num_classes: Optional[int]        # None: a streamed split with integer labels (give --num-classes)
    class_names: Optional[list[str]]

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, datasets.IterableDataset)


def is_streamed(name_or_path: Union[str, os.PathLike, None]) -> bool:
    """timm's `hfids/...` or `wds/...`, unless a local path of that name exists (then it is read map-style)."""
    kind, _, name = str(name_or_path).partition("/")
    return kind in STREAMED_TYPES and bool(name) and not Path(str(name_or_path)).exists()


def load_image_dataset(
    name_or_path: Union[str, os.PathLike, None] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    train_split: Optional[str] = None,
    eval_split: Optional[str] = None,
) -> ImageDataset:
    """Load an image classification dataset: a Hub id (also as timm's `hfds/ID`), a local data folder or
    file, an imagefolder, or a `save_to_disk` folder. `None` loads the shipped Fashion-MNIST subset
    (`DEFAULT_DATASET`). Streamed (`datasets.IterableDataset` splits, images left undecoded so that an unreadable
    one can be skipped): `hfids/` and a Hub id or local folder or file of parquet/image shards, `wds/` and
    webdataset tar shards (a folder, a file, a glob or a URL)."""
    streamed = is_streamed(name_or_path)
    source = _strip_timm_prefix(str(DEFAULT_DATASET if name_or_path is None else name_or_path))
    dd = _load_stream(str(name_or_path).partition("/")[0], source) if streamed else _load(source)

    train_split = train_split or "train"
    if train_split not in dd:
        raise MLTPConfigError(
            f"Dataset {source!r} has no train split {train_split!r}; its splits are {sorted(dd)}. "
            f"Pass the split to train on with train_split= (--train-split).")
    if eval_split is not None and eval_split not in dd:
        raise MLTPConfigError(
            f"Dataset {source!r} has no eval split {eval_split!r}; its splits are {sorted(dd)}. "
            f"Pass one of these with eval_split= (--eval-split), or leave it unset to pick "
            f"{'/'.join(EVAL_SPLITS)} automatically.")
    eval_split = eval_split or next((s for s in EVAL_SPLITS if s in dd and s != train_split), None)
    train = dd[train_split]
    eval_ = dd[eval_split] if eval_split else None

    features = train.features
    if features is None:   # a stream whose files do not state their columns' types
        raise MLTPConfigError(
            f"Dataset {source!r}: the stream does not state its columns' types; store the shards as parquet (with "
            f"an Image and a ClassLabel column) or as webdataset tars (image and .cls files).")
    image_column = _pick_column(source, features, image_column, IMAGE_COLUMNS, datasets.Image, "image")
    label_column = _pick_column(source, features, label_column, LABEL_COLUMNS, datasets.ClassLabel, "label")
    if image_column == label_column:
        raise MLTPConfigError(
            f"Dataset {source!r}: image and label column are both {image_column!r}. "
            f"Pass distinct --image-column and --label-column.")
    if eval_ is not None:
        missing = [c for c in (image_column, label_column) if c not in eval_.column_names]
        if missing:
            raise MLTPConfigError(
                f"Dataset {source!r}: eval split {eval_split!r} lacks column(s) {missing}; its columns are "
                f"{eval_.column_names}. Pass an eval split that has images and labels with --eval-split.")

    splits = {"train": train, "eval": eval_}
    splits = {k: _prepare_image_column(source, v, image_column) for k, v in splits.items() if v is not None}
    splits = _prepare_label_column(source, splits, label_column)
    label_feature = splits["train"].features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes, class_names = label_feature.num_classes, list(label_feature.names)
    elif streamed:   # a stream cannot be scanned for its largest label
        num_classes, class_names = None, None
    else:
        num_classes, class_names = 1 + max(_max_label(source, d, label_column) for d in splits.values()), None
    if streamed:     # the two columns only (webdataset adds __key__, __url__)
        splits = {k: d.select_columns([image_column, label_column]) for k, d in splits.items()}
    return ImageDataset(splits["train"], splits.get("eval"), image_column, label_column, num_classes, class_names)


def _strip_timm_prefix(source: str) -> str:
    """timm names a dataset `<type>/<name>`; `hfds/` (map-style), `hfids/` and `wds/` (streamed) are read here."""
    kind, _, name = source.partition("/")
    if kind in ("hfds", *STREAMED_TYPES) and name and not Path(source).exists():
        return name
    if kind in TIMM_DATASET_TYPES and name and not Path(source).exists():
        raise MLTPConfigError(
            f"Dataset {source!r}: timm's {kind}/ datasets are read by timm's own loaders, which this recipe does "
            f"not use; give a Hugging Face hub id (hfds/ID or ID; hfids/ID streams it), webdataset shards (wds/PATH), "
            f"or a local folder or file.")
    return source


def _load(source: str) -> datasets.DatasetDict:
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))  # memory-maps, unlike load_dataset which would copy into the cache
    elif path.is_dir():
        loaded = _call_load_dataset(source, str(path))
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise MLTPConfigError(
                f"Dataset file {source!r} has an unsupported type; expected one of {sorted(FILE_BUILDERS)}, "
                f"a folder (parquet/arrow/csv files, an imagefolder, or a save_to_disk folder) or a Hub id.")
        loaded = _call_load_dataset(source, builder, data_files={"train": str(path)})
    elif HUB_ID.match(source):
        loaded = _load_hub(source)
    else:
        raise MLTPConfigError(
            f"Dataset path {source!r} does not exist (and is not a Hub dataset id such as 'owner/name'). "
            f"Pass an existing folder or file, a Hub id, or nothing for the shipped default {str(DEFAULT_DATASET)!r}.")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise MLTPConfigError(f"Dataset {source!r} loaded as {type(loaded).__name__}; expected a (map-style) "
                              f"DatasetDict. Streaming datasets are not supported.")
    return loaded


def _load_stream(kind: str, source: str) -> datasets.IterableDatasetDict:
    """`datasets.load_dataset(..., streaming=True)`. wds/ goes through datasets' "webdataset" builder rather than
    timm's wds reader: it needs no `webdataset` package, and the stream is then a `datasets.IterableDataset` like
    hfids/'s, so one path (shuffle buffer, split_dataset_by_node, exact resume) serves both."""
    path = Path(source).expanduser()
    if kind == "wds":
        shards = {"data_dir": str(path)} if path.is_dir() else {"data_files": {"train": source}}
        loaded = _call_load_dataset(f"{kind}/{source}", "webdataset", streaming=True, **shards)
    elif path.is_dir():
        loaded = _call_load_dataset(f"{kind}/{source}", str(path), streaming=True)
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower(), "webdataset" if path.suffix == ".tar" else None)
        if builder is None:
            raise MLTPConfigError(f"Dataset file {kind}/{source!r} has an unsupported type; expected one of "
                                  f"{sorted(FILE_BUILDERS)} or .tar, or a folder of shards, or a Hub id.")
        loaded = _call_load_dataset(f"{kind}/{source}", builder, data_files={"train": str(path)}, streaming=True)
    elif HUB_ID.match(source):
        loaded = _load_hub(source, streaming=True)
    else:
        raise MLTPConfigError(f"Dataset {kind}/{source!r}: {source!r} is no local folder or file and no Hub dataset "
                              f"id; give a folder of parquet/image/tar shards, a shard file, or a Hub id.")
    if isinstance(loaded, datasets.IterableDataset):
        loaded = datasets.IterableDatasetDict({"train": loaded})
    return loaded


def _call_load_dataset(source, *args, **kwargs):
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types for unreadable folders; the cause stays chained
        raise MLTPConfigError(
            f"Could not load dataset {source!r} with datasets.load_dataset: {type(e).__name__}: {e}. "
            f"Expected a folder of parquet/arrow/csv/json files (train/test or train/validation splits), "
            f"an imagefolder (one subfolder per class), or a save_to_disk folder.") from e


def _load_hub(source, streaming: bool = False):
    try:
        return datasets.load_dataset(source, streaming=streaming)
    except Exception as e:
        if datasets.config.HF_HUB_OFFLINE or "offline" in str(e).lower():
            raise MLTPConfigError(
                f"Dataset {source!r} is not a local path, and as a Hub dataset id it cannot be loaded because "
                f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache. "
                f"Load it once while online, or pass a local folder (e.g. one written with save_to_disk), "
                f"or nothing for the shipped default.") from e
        raise MLTPConfigError(
            f"Dataset {source!r} is not a local path and could not be loaded from the Hub: "
            f"{type(e).__name__}: {e}. Check the id, your network and token, or pass a local folder.") from e


def _pick_column(source, features, given, candidates, feature_type, kind):
    columns = list(features)
    if given is not None:
        if given not in features:
            raise MLTPConfigError(
                f"Dataset {source!r} has no {kind} column {given!r}; its columns are {columns}. "
                f"Pass one of these with --{kind}-column.")
        return given
    found = next((c for c in candidates if c in features), None)
    found = found or next((c for c, f in features.items() if isinstance(f, feature_type)), None)
    if found is None:
        raise MLTPConfigError(
            f"Dataset {source!r}: found no {kind} column; expected one named {'/'.join(candidates)} or a "
            f"datasets.{feature_type.__name__} feature, but its columns are {columns}. "
            f"Name the column with --{kind}-column.")
    return found


def _prepare_image_column(source, ds, column):
    """Images as datasets.Image; a stream's are left undecoded (the transform decodes them), so that an unreadable
    one is skipped (StreamedSplit) instead of ending the stream's iterator."""
    feature = ds.features[column]
    streamed = isinstance(ds, datasets.IterableDataset)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False)) if streamed else ds
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # file paths (absolute, or relative to the cwd)
        return ds.cast_column(column, datasets.Image(decode=not streamed))
    if isinstance(feature, _ARRAY_FEATURES):
        return ds  # pixel arrays (HxW or HxWxC, uint8); converted per example in apply_transforms
    raise MLTPConfigError(
        f"Dataset {source!r}: image column {column!r} has type {feature}; expected datasets.Image, file path "
        f"strings or pixel arrays. Pick another column with --image-column.")


def _prepare_label_column(source, splits, column):
    feature = splits["train"].features[column]
    if isinstance(feature, datasets.ClassLabel):
        return splits
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string") and isinstance(splits["train"], datasets.IterableDataset):
        raise MLTPConfigError(
            f"Dataset {source!r}: label column {column!r} holds class names, which a stream cannot be scanned for; "
            f"store the labels as a ClassLabel feature or as integer ids (and give --num-classes).")
    if dtype in ("string", "large_string"):
        # Encode class names with one mapping across splits (DatasetDict.class_encode_column encodes each split alone).
        names = sorted(set().union(*(d.unique(column) for d in splits.values())) - {None})
        return {k: d.cast_column(column, datasets.ClassLabel(names=names)) for k, d in splits.items()}
    if dtype is None or not re.fullmatch(r"u?int\d+", dtype):
        raise MLTPConfigError(
            f"Dataset {source!r}: label column {column!r} has type {feature}; expected a ClassLabel, integer "
            f"class ids or class name strings. Pick another column with --label-column.")
    return splits


def _max_label(source, ds, column):
    labels = ds.with_format("numpy", columns=[column])[:][column]  # ds[column] is a lazy Column in datasets>=4
    if len(labels) and labels.min() < 0:
        raise MLTPConfigError(
            f"Dataset {source!r}: label column {column!r} has negative values (min {labels.min()}); expected "
            f"class ids 0..num_classes-1 (unlabeled eval splits cannot be used for evaluation).")
    return int(labels.max()) if len(labels) else -1


def create_transforms(model, img_size=None, is_training: bool = True, **aug) -> Callable:
    """timm's transform for `model`: `resolve_data_config` + `create_transform`.

    `img_size` (int or (h, w)) overrides the model's input size. `aug` holds data-config keys
    (input_size, mean, std, crop_pct, crop_mode, interpolation, in_chans) and any other `create_transform`
    kwargs, e.g. `scale=(0.8, 1.0)`, `hflip=0.0`, `color_jitter=0.0`, `auto_augment='rand-m9-mstd0.5'`.
    The timm training default is RandomResizedCrop(scale=(0.08, 1)), + hflip + ColorJitter(0.4),
    which is harsh for 28x28 images.
    """
    import timm.data

    aug = {k: v for k, v in aug.items() if v is not None}   # None: timm's default, or the model's
    keys = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
    args = {k: aug.pop(k) for k in keys if k in aug}
    in_chans = aug.pop("in_chans", None) or getattr(model, "in_chans", None)
    cfg = timm.data.resolve_data_config(args, model=model)
    in_chans = in_chans or cfg["input_size"][0]
    if img_size is None:
        hw = cfg["input_size"][1:]
    else:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg["input_size"] = (in_chans, *hw)
    for key in ("mean", "std"):  # a pretrained cfg keeps 3-channel stats even for an in_chans=1 model
        if len(cfg[key]) != in_chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * in_chans
    return _posterize_keeps_zero_bits(timm.data.create_transform(**cfg, is_training=is_training, **aug))


def _posterize_to_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with "keep 0 bits" meaning a black image as in Pillow < 13 (Pillow 13 raises)."""
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _posterize_keeps_zero_bits(transform):
    """The transform, with every timm posterize op able to keep 0 bits.

    timm's RandAugment with increasing levels (`rand-...-inc1`, timm's usual recipe) posterizes to 4 - 4 * M /
    10 bits, 0 at magnitude 10, which a magnitude std reaches. Pillow 13 refuses 0 bits, so training with it
    would stop at a random step (measured: the first epoch on 2,000 images at rand-m9-mstd0.5-inc1).
    """
    from timm.data import auto_augment
    stack = [transform]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, auto_augment.AugmentOp):
            if item.aug_fn is auto_augment.posterize:
                item.aug_fn = _posterize_to_zero_bits
        else:
            stack.extend(getattr(item, name) for name in ("transforms", "ops", "policy") if hasattr(item, name))
    return transform


def _to_pil(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, dict):  # undecoded datasets.Image value
        return Image.open(value["path"]) if value.get("bytes") is None else Image.open(io.BytesIO(value["bytes"]))
    arr = np.asarray(value)
    return Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)


def convert_image(img, mode: str = "RGB") -> Image.Image:
    """Convert any PIL image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) or pixel array to `mode` ('RGB' or 'L')."""
    img = _to_pil(img)
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # PIL's convert clips 16/32-bit values at 255 (a mostly white image); rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning for palette transparency given as bytes
    return img.convert(mode)


class _ImageTransform:
    """A class, not a closure, so the transformed dataset pickles into DataLoader workers under spawn."""

    def __init__(self, transform, image_column, label_column, mode):
        self.transform, self.image_column, self.label_column, self.mode = transform, image_column, label_column, mode

    def __call__(self, batch: dict) -> dict:
        return {
            "pixel_values": [self.transform(convert_image(im, self.mode)) for im in batch[self.image_column]],
            "labels": [int(y) for y in batch[self.label_column]],
        }

    def one(self, row: dict) -> dict:
        """One row (a streamed sample) as `{"pixel_values": tensor, "labels": int}`."""
        return {"pixel_values": self.transform(convert_image(row[self.image_column], self.mode)),
                "labels": int(row[self.label_column])}


def image_transform(transform: Callable, image_column: str, label_column: str, in_chans: int,
                    column_names) -> _ImageTransform:
    """`transform` on a dataset's rows (checked: the columns exist, in_chans is 1 or 3)."""
    if in_chans not in (1, 3):
        raise MLTPConfigError(f"in_chans={in_chans!r} is not supported; expected 1 (grayscale) or 3 (RGB).")
    for column, kind in ((image_column, "image"), (label_column, "label")):
        if column not in column_names:
            raise MLTPConfigError(f"Dataset has no {kind} column {column!r}; its columns are "
                                  f"{column_names}. Pass one of these with --{kind}-column.")
    return _ImageTransform(transform, image_column, label_column, "RGB" if in_chans == 3 else "L")


def apply_transforms(dataset: datasets.Dataset, transform: Callable, image_column: str, label_column: str,
                     in_chans: int = 3) -> datasets.Dataset:
    """Lazily (`with_transform`) turn rows into `{"pixel_values": CxHxW tensor, "labels": int}`.

    With the HF Trainer set `remove_unused_columns=False`, since the transform needs the raw columns.
    """
    to_tensors = image_transform(transform, image_column, label_column, in_chans, dataset.column_names)
    return dataset.with_transform(to_tensors, columns=[image_column, label_column])


def collate_image_batch(examples: list) -> dict:
    """Stack `apply_transforms` examples: a DataLoader `collate_fn` and an HF Trainer `data_collator`.
    Examples from `SkipUnreadable` add `skipped`, per sample the number of unreadable samples it replaced: per
    sample, so that an evaluation gathered over processes drops it with the padding it drops."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }
    if "skipped" in examples[0]:
        batch["skipped"] = torch.tensor([e["skipped"] for e in examples], dtype=torch.long)
    return batch


class UnreadableData(MLTPConfigError):
    """Too many samples of a split cannot be read. A DataLoader worker's exception reaches the main process
    rebuilt from its traceback text; the message is then the traceback's last line, so it stays one line."""

    def __init__(self, message: str):
        if message.startswith("Caught "):    # torch.utils.data._utils.ExceptionWrapper.reraise
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


def check_unreadable_share(split: str, skipped: int, size: int, max_share: float) -> None:
    """Stop when more than `max_share` of a split's `size` samples were unreadable in one epoch."""
    if skipped > max_share * size:
        raise UnreadableData(f"{skipped} of the {size} samples in split {split!r} were unreadable in this epoch so "
                             f"far, more than --max-bad-share {max_share:g} (the warnings above name each); repair "
                             f"or remove them, or raise --max-bad-share")


class SkipUnreadable(torch.utils.data.Dataset):
    """A sample that cannot be read or decoded is replaced by the next readable index, as timm's ImageDataset
    does: a warning names the split, the index and the reason, and after `max_in_row` unreadable samples in a
    row it stops.

    The replacement depends on the index alone, so loader batches keep their 2B samples (task i and task j
    stay formed) and a resumed run skips the same samples. Each sample carries `skipped`, the number of
    unreadable samples it replaces, for the loop to count (loader workers cannot count in the main process).
    """

    def __init__(self, dataset, split: str, max_in_row: int = 10):
        self.dataset, self.split, self.max_in_row = dataset, split, max_in_row

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for skipped in range(self.max_in_row):
            k = (int(index) + skipped) % len(self.dataset)
            try:
                return {**self.dataset[k], "skipped": skipped}
            except (OSError, SyntaxError) as e:   # PIL: UnidentifiedImageError, truncated files; broken chunks
                _logger.warning("skipped an unreadable sample: split %r, index %d: %s: %s", self.split, k,
                                type(e).__name__, e)
        raise UnreadableData(f"{self.max_in_row} samples in a row of split {self.split!r} cannot be read (indices "
                             f"{int(index)} to {k}; the warnings above give each reason); repair or remove them, "
                             f"or raise --max-bad-samples")


class SeededAugmentation(torch.utils.data.Dataset):
    """Random augmentation of sample n in epoch e drawn from a generator seeded by (seed, e, n).

    The global random state is left as it was, so dropout draws do not depend on data loading:
    resuming mid-epoch reproduces an uninterrupted run exactly, with any number of workers.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return seeded((self.seed, self.epoch, int(index)), self.dataset.__getitem__, int(index))


def seeded(key: tuple, fn: Callable, *args):
    """fn(*args) with torch's and Python's random draws seeded by `key` (a tuple of ints); the global random
    states are left as they were."""
    sample_seed = hash(key) & 0x7FFF_FFFF_FFFF_FFFF
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)         # timm's crops draw from `random`
        try:
            return fn(*args)
        finally:
            random.setstate(python_state)


class StreamedSplit(torch.utils.data.IterableDataset):
    """One process's part of a streamed split (`datasets.IterableDataset`, already shuffled and split by node)
    as loader batches of `batch_size` samples: `batches` of them per epoch (training), or one pass (None: eval).

    Exact resume: the epoch's stream is a function of (seed, epoch) alone (`set_epoch`), sample n of it is
    augmented from a generator seeded by (seed, epoch, rank, n), and `start_batch` batches are skipped by
    reading past their samples undecoded. Loader workers: worker w of W builds batches w, w + W, ... (the order
    in which the DataLoader takes them); each worker reads the process's stream and decodes only its own
    batches' images, so the batches are the same with any number of workers.

    A part shorter than an epoch is read again (its next pass shuffled anew). An unreadable sample is replaced
    by the next readable one, as `SkipUnreadable` does, and counted in `skipped`.
    """

    READ_ROWS = 64    # rows taken from the stream at a time

    def __init__(self, stream: datasets.IterableDataset, transform: Callable, split: str, batch_size: int,
                 batches: Optional[int], seed: int = 0, rank: int = 0, max_in_row: int = 10):
        self.stream, self.transform, self.split, self.batch_size = stream, transform, split, batch_size
        self.batches, self.seed, self.rank, self.max_in_row = batches, seed, rank, max_in_row
        self.epoch, self.start_batch = 0, 0

    def __len__(self):   # training: the samples of this process's epoch (the DataLoader's len is in batches)
        if self.batches is None:
            raise TypeError("a streamed eval split has no length")
        return self.batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self):
        """The epoch's undecoded rows in order; training reads further passes as needed."""
        for repeat in itertools.count():
            # a further pass of the epoch gets an order of its own, distinct from every epoch's first pass
            self.stream.set_epoch(self.epoch + repeat * 1_000_003)
            # iter(), not the dataset's __iter__: in a loader worker that one would read only some of its shards
            count = 0
            for rows in self.stream.iter(batch_size=self.READ_ROWS):
                for k in range(len(next(iter(rows.values())))):
                    count += 1
                    yield {column: values[k] for column, values in rows.items()}
            if self.batches is None:
                return
            if not count:
                raise MLTPConfigError(f"the streamed split {self.split!r} gave process {self.rank} no samples: it has "
                                      f"fewer shards or samples than processes; use fewer processes or more shards")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rows = self._rows()
        ahead, position = deque(), 0     # rows read and kept; ahead[0] is sample `position` of the epoch
        batch = self.start_batch + worker
        while self.batches is None or batch < self.batches:
            for n in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                while position < n:      # read past other workers' samples (and, resumed, the epoch's first ones)
                    if not ahead and not _read_one(rows, ahead):
                        return
                    ahead.popleft()
                    position += 1
                sample = self._sample(n, ahead, rows)
                if sample is None:       # eval: the pass has ended
                    return
                yield sample
            batch += workers

    def _sample(self, n: int, ahead: deque, rows) -> Optional[dict]:
        """Sample n (ahead[0]); when it cannot be read, the next readable one, read on from `rows`."""
        for skipped in range(self.max_in_row):
            if len(ahead) <= skipped and not _read_one(rows, ahead):
                return None
            try:
                return {**seeded((self.seed, self.epoch, self.rank, n), self.transform, ahead[skipped]),
                        "skipped": skipped}
            except (OSError, SyntaxError) as e:   # PIL: UnidentifiedImageError, truncated files
                _logger.warning("skipped an unreadable sample: split %r, process %d, sample %d of epoch %d: %s: %s",
                                self.split, self.rank, n + skipped, self.epoch, type(e).__name__, e)
        raise UnreadableData(f"{self.max_in_row} samples in a row of split {self.split!r} cannot be read (process "
                             f"{self.rank}, samples {n} to {n + self.max_in_row - 1} of epoch {self.epoch}; the "
                             f"warnings above give each reason); repair or remove them, or raise --max-bad-samples")


def _read_one(rows, ahead: deque) -> bool:
    row = next(rows, None)
    if row is not None:
        ahead.append(row)
    return row is not None


def mix_within_tasks(mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's `Mixup` (mixup/cutmix) applied to task i and task j separately: it pairs sample k with sample
    N-1-k of the batch it is given, so given the whole 2B batch it would mix task i into task j (SPEC.md,
    Batches: mixing stays within each task). Returns the images and soft targets of both tasks, in order."""
    half = len(images) // 2
    task_i = mixup(images[:half].clone(), labels[:half])
    task_j = mixup(images[half:].clone(), labels[half:])
    return torch.cat([task_i[0], task_j[0]]), torch.cat([task_i[1], task_j[1]])
