import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import collections  # noqa: E402
import pickle  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from timm_mltp.data import (  # noqa: E402
    DEFAULT_DATASET, ImageDataset, apply_transforms, collate_image_batch, convert_image, create_transforms,
    load_image_dataset,
)
from timm_mltp.errors import MLTPConfigError  # noqa: E402

datasets.disable_progress_bars()
NAMES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def model():
    import timm
    return timm.create_model("test_resnet", num_classes=10)


@pytest.fixture(scope="module")
def eval_tf(model):
    return create_transforms(model, img_size=16, is_training=False)


def _png(mode, size=(6, 5), value=7):
    shape = (size[1], size[0]) + {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    return Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode)


def _small(n_per_class=2, label_feature=None, image_col="image", label_col="label"):
    labels = [c for c in range(len(NAMES)) for _ in range(n_per_class)]
    features = datasets.Features({image_col: datasets.Image(),
                                  label_col: label_feature or datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({image_col: [_png("L", value=y) for y in labels], label_col: labels},
                                      features=features)


def test_default_dataset_shipped_and_balanced():
    assert (DEFAULT_DATASET / "train.parquet").is_file() and (DEFAULT_DATASET / "README.md").is_file()
    ds = load_image_dataset()
    assert isinstance(ds, ImageDataset)
    assert (len(ds.train), len(ds.eval)) == (10_000, 2_000)
    assert (ds.image_column, ds.label_column, ds.num_classes) == ("image", "label", 10)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert set(collections.Counter(ds.train["label"]).values()) == {1000}
    assert set(collections.Counter(ds.eval["label"]).values()) == {200}
    img = ds.train[0]["image"]
    assert img.mode == "L" and img.size == (28, 28)


def test_default_dataset_reads_with_plain_datasets():
    d = datasets.load_dataset("parquet", data_files={s: str(DEFAULT_DATASET / f"{s}.parquet") for s in ("train", "test")})
    assert d["test"].features["label"].names[8] == "Bag"


def test_parquet_folder(tmp_path):
    _small().to_parquet(str(tmp_path / "train.parquet"))
    _small(1).to_parquet(str(tmp_path / "validation.parquet"))
    ds = load_image_dataset(tmp_path)
    assert (len(ds.train), len(ds.eval), ds.num_classes, ds.class_names) == (6, 3, 3, NAMES)


def test_single_file_and_int_labels(tmp_path):
    _small(label_feature=datasets.Value("int64"), image_col="img", label_col="target").to_parquet(
        str(tmp_path / "d.parquet"))
    ds = load_image_dataset(tmp_path / "d.parquet")
    assert (ds.image_column, ds.label_column, ds.num_classes, ds.class_names, ds.eval) == ("img", "target", 3, None, None)


def test_string_labels_encoded_consistently(tmp_path):
    d = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [_png("L")] * 2, "label": ["b", "c"]},
                                            features=datasets.Features({"image": datasets.Image(),
                                                                        "label": datasets.Value("string")})),
        "test": datasets.Dataset.from_dict({"image": [_png("L")] * 2, "label": ["a", "c"]},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "label": datasets.Value("string")})),
    })
    d.save_to_disk(str(tmp_path / "d"))
    ds = load_image_dataset(tmp_path / "d")
    assert ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.train["label"] == [1, 2] and ds.eval["label"] == [0, 2]


def test_imagefolder(tmp_path, eval_tf):
    for split, n in (("train", 2), ("test", 1)):
        for name in NAMES[:2]:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                _png("RGB", value=40 * i).save(tmp_path / split / name / f"{i}.png")
    ds = load_image_dataset(tmp_path)
    assert (len(ds.train), len(ds.eval), ds.num_classes, ds.class_names) == (4, 2, 2, NAMES[:2])
    assert apply_transforms(ds.eval, eval_tf, ds.image_column, ds.label_column)[0]["pixel_values"].shape == (3, 16, 16)


def test_save_to_disk_folder_and_explicit_splits(tmp_path):
    datasets.DatasetDict({"fit": _small(), "holdout": _small(1), "test": _small(1)}).save_to_disk(str(tmp_path / "dd"))
    ds = load_image_dataset(tmp_path / "dd", train_split="fit", eval_split="holdout")
    assert (len(ds.train), len(ds.eval), ds.num_classes) == (6, 3, 3)
    _small().save_to_disk(str(tmp_path / "single"))
    ds = load_image_dataset(tmp_path / "single")
    assert len(ds.train) == 6 and ds.eval is None


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "I", "F"])
def test_image_modes_become_rgb_or_gray(mode, model, eval_tf):
    img = _png("RGBA", value=200).convert(mode) if mode in ("RGB", "RGBA", "P", "LA") else _png("L", value=200)
    if mode == "I;16":
        img = Image.fromarray(np.full((5, 6), 200 * 257, dtype=np.uint16))
        assert img.mode == "I;16"
    elif mode in ("I", "F"):
        img = img.convert(mode)
    assert np.asarray(convert_image(img, "L")).max() == 200  # 16-bit rescaled, not clipped to white
    ds = datasets.Dataset.from_dict({"image": [img], "label": [1]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    for in_chans in (3, 1):
        tf = eval_tf if in_chans == 3 else create_transforms(model, img_size=16, is_training=False, in_chans=1)
        out = apply_transforms(ds, tf, "image", "label", in_chans=in_chans)[0]
        assert out["pixel_values"].shape == (in_chans, 16, 16) and out["labels"] == 1


def test_training_transform_passes_timm_kwargs(model):
    tf = create_transforms(model, img_size=32, scale=(0.8, 1.0), hflip=0.0, color_jitter=0.0, crop_pct=1.0)
    text = repr(tf)
    assert "size=(32, 32)" in text and "scale=(0.8, 1.0)" in text and "HorizontalFlip" not in text
    assert tf(_png("RGB", size=(28, 28))).shape == (3, 32, 32)


def test_randaugment_posterize_to_zero_bits_is_black(model):
    """timm's rand-...-inc1 asks posterize for 0 bits at magnitude 10, which Pillow 13 refuses: the training
    transform turns the image black instead, as Pillow < 13 did, and the image's other values go through."""
    from timm.data.auto_augment import AugmentOp
    tf = create_transforms(model, img_size=8, auto_augment="rand-m10-mstd0-inc1")
    ops = [op for t in tf.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, image = 1.0, _png("RGB", size=(8, 8), value=200)
    assert op.level_fn(10.0, op.hparams) == (0,)                      # what timm asks for at magnitude 10
    assert np.asarray(op(image)).max() == 0
    op.magnitude = 5.0                                               # 2 bits: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(image)).max() == 192
    native = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10.0)
    if int(Image.__version__.split(".")[0]) >= 13:
        with pytest.raises(ValueError, match="bits"):
            native(image)


def test_collate_round_trip(eval_tf):
    ds = apply_transforms(_small(), eval_tf, "image", "label")
    batch = collate_image_batch([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    loader = torch.utils.data.DataLoader(pickle.loads(pickle.dumps(ds)), batch_size=4, collate_fn=collate_image_batch)
    assert [b["labels"].shape[0] for b in loader] == [4, 2]


# --- bad input ------------------------------------------------------------------------------------

def _raises(*words, **kwargs):
    with pytest.raises(MLTPConfigError) as info:
        load_image_dataset(**kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_missing_path(tmp_path):
    _raises(str(tmp_path / "nope"), "does not exist", "Hub", name_or_path=tmp_path / "nope")
    _raises("does not exist", name_or_path="./no/such/dir/")


def test_hub_id_offline(monkeypatch):
    # datasets reads HF_HUB_OFFLINE at import, which may precede this module in a full test run.
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _raises("someone/some-dataset", "offline", "HF_HUB_OFFLINE", "local folder", name_or_path="someone/some-dataset")


def test_timm_dataset_names(monkeypatch, tmp_path):
    """timm's `hfds/ID` is the hub dataset ID; timm's other types need timm's loaders and are refused."""
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = _raises("'someone/some-dataset'", "offline", name_or_path="hfds/someone/some-dataset")
    assert "hfds" not in msg
    _raises("torch/cifar10", "timm's torch/ datasets", "hub id", name_or_path="torch/cifar10")
    monkeypatch.chdir(tmp_path)                     # a local folder of that name wins
    datasets.DatasetDict({"train": _small()}).save_to_disk("wds/mine")
    assert len(load_image_dataset("wds/mine").train) == 6


def test_no_train_split(tmp_path):
    datasets.DatasetDict({"fit": _small(), "test": _small(1)}).save_to_disk(str(tmp_path))
    _raises("'train'", "['fit', 'test']", "train_split", name_or_path=tmp_path)
    _raises("'valid'", "['fit', 'test']", "eval_split", name_or_path=tmp_path, train_split="fit", eval_split="valid")


def test_no_image_or_label_column(tmp_path):
    d = datasets.Dataset.from_dict({"picture_path": ["a.png"], "y": [0], "z": [1.5]},
                                   features=datasets.Features({"picture_path": datasets.Value("string"),
                                                               "y": datasets.Value("int64"),
                                                               "z": datasets.Value("float32")}))
    d.save_to_disk(str(tmp_path / "a"))
    _raises("no image column", "picture_path", "--image-column", name_or_path=tmp_path / "a")
    _small(image_col="photo", label_col="y").rename_column("y", "kind").save_to_disk(str(tmp_path / "b"))
    assert load_image_dataset(tmp_path / "b").image_column == "photo"  # found by its Image feature
    d = _small().cast_column("label", datasets.Value("int64")).rename_column("label", "kind")
    d.save_to_disk(str(tmp_path / "c"))
    _raises("no label column", "'kind'", "--label-column", name_or_path=tmp_path / "c")
    assert load_image_dataset(tmp_path / "c", label_column="kind").num_classes == 3
    _raises("label column 'z'", "float", "--label-column", name_or_path=tmp_path / "a", image_column="picture_path",
            label_column="z")
    _raises("image column 'y'", "int64", "--image-column", name_or_path=tmp_path / "a", image_column="y",
            label_column="z")


def test_given_column_missing(tmp_path):
    _small().save_to_disk(str(tmp_path))
    _raises("image column 'pic'", "['image', 'label']", "--image-column", name_or_path=tmp_path, image_column="pic")
    _raises("label column 'cls'", "['image', 'label']", "--label-column", name_or_path=tmp_path, label_column="cls")


def test_folder_without_data(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises("Could not load", "imagefolder", name_or_path=tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    _raises("unsupported type", ".parquet", name_or_path=tmp_path / "x.txt")


def test_apply_transforms_bad_input(eval_tf):
    with pytest.raises(MLTPConfigError, match="in_chans"):
        apply_transforms(_small(), eval_tf, "image", "label", in_chans=4)
    with pytest.raises(MLTPConfigError, match="--label-column"):
        apply_transforms(_small(), eval_tf, "image", "cls")


def test_csv_folder_with_image_paths(tmp_path, eval_tf):
    for i, name in enumerate(["a", "b", "c"]):
        _png("RGBA", value=50 * i).save(tmp_path / f"{name}.png")
    (tmp_path / "train.csv").write_text(
        "image,label\n" + "".join(f"{tmp_path / n}.png,{n}\n" for n in ["a", "b", "c"]))
    (tmp_path / "test.csv").write_text(f"image,label\n{tmp_path / 'a'}.png,a\n")
    ds = load_image_dataset(tmp_path)
    assert (ds.num_classes, ds.class_names, len(ds.eval)) == (3, ["a", "b", "c"], 1)
    assert apply_transforms(ds.train, eval_tf, "image", "label")[2]["pixel_values"].shape == (3, 16, 16)
