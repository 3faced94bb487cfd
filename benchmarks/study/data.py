"""The study's data: the full Fashion-MNIST, converted once (the shipped subset is 10k/2k)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FULL_DATA = ROOT / "data" / "fashion-mnist-full"


def ensure_full_dataset() -> Path:
    """Convert the full Fashion-MNIST once (scripts/make_fashion_mnist.py --full), atomically: a killed
    conversion must not leave a folder that later runs take for complete."""
    if (FULL_DATA / "dataset_dict.json").is_file():
        return FULL_DATA
    spec = importlib.util.spec_from_file_location("make_fashion_mnist", ROOT / "scripts" / "make_fashion_mnist.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    source = maker.find_source(None)   # ../shared/data/fashion-mnist beside the checkout first; exits if absent
    partial = FULL_DATA.with_name(FULL_DATA.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting the full Fashion-MNIST from {source} into {FULL_DATA} (once)")
    maker.write_full(source, partial)
    partial.rename(FULL_DATA)
    return FULL_DATA
