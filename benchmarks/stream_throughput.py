"""Samples per second of the engine's training step fed by streamed data (hfids/ on parquet shards) against the
same step fed by the map-style path (the same parquet files), and their ratio, in one process.

Both runs are engine Trainers with the same options (default MLTP step, test_resnet at 32 px unless told); each
measures whole loader-to-optimizer steps, data loading included. The two alternate in rounds of --steps steps, so
machine noise hits both alike; the figures are the medians over the rounds, after one warm-up round each.

    python benchmarks/stream_throughput.py                          # 4,096 shipped images in 8 shards, B = 32
    python benchmarks/stream_throughput.py --workers 2 --rounds 7   # with loader workers
    python benchmarks/stream_throughput.py --images 256 --steps 2 --rounds 1   # a check that it runs (seconds)

Run it on a quiet machine: it times the step.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

from timm_mltp.data import DEFAULT_DATASET  # noqa: E402
from timm_mltp.engine import TrainArgs, Trainer  # noqa: E402


def write_shards(folder: Path, images: int, shards: int) -> None:
    """The first `images` shipped training images as `shards` parquet files, and a small test split."""
    for split, n, parts in (("train", images, shards), ("test", 64, 1)):
        ds = datasets.load_dataset("parquet", data_files=str(DEFAULT_DATASET / f"{split}.parquet"), split="train")
        ds = ds.select(range(min(n, len(ds))))
        for k in range(parts):
            ds.shard(parts, k, contiguous=True).to_parquet(str(folder / f"{split}-{k:05d}.parquet"))


def trainer(folder: Path, streamed: bool, opts: argparse.Namespace) -> Trainer:
    data = dict(dataset=f"hfids/{folder}", train_num_samples=opts.images) if streamed else dict(dataset=str(folder))
    return Trainer(TrainArgs(model=opts.model, img_size=32, batch_size=opts.batch_size, workers=opts.workers,
                             epochs=1000, output=str(folder / "out"), experiment="streamed" if streamed else "map",
                             progress=False, **data))


def steps_per_second(run: Trainer, batches, steps: int) -> float:
    """Time `steps` loader-to-optimizer steps of `run`, reading from its epoch's `batches` iterator."""
    start = time.perf_counter()
    for _ in range(steps):
        run.train_step(next(batches))
    return steps / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="one task; a step takes 2 x this")
    p.add_argument("--images", type=int, default=4096, help="training images written as parquet shards")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each path, after one warm-up round")
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder, opts.images, opts.shards)
        runs = {"map-style": trainer(folder, False, opts), "streamed": trainer(folder, True, opts)}
        steps_in_epoch = min(len(r.train_loader) for r in runs.values())
        if opts.steps * (opts.rounds + 1) > steps_in_epoch:
            sys.exit(f"--steps {opts.steps} x (--rounds {opts.rounds} + 1) exceeds an epoch of {steps_in_epoch} steps; "
                     f"give more --images or fewer steps")
        for run in runs.values():
            run.model.train()
        batches = {name: iter(run.epoch_loader()) for name, run in runs.items()}
        rates = {name: [] for name in runs}
        for round_ in range(opts.rounds + 1):
            for name, run in runs.items():
                rate = steps_per_second(run, batches[name], opts.steps) * 2 * opts.batch_size
                if round_:                          # round 0 warms up (loader start, first allocations)
                    rates[name].append(rate)
        median = {name: statistics.median(r) for name, r in rates.items()}
        print(f"{opts.model}, 2 x {opts.batch_size} samples per step, {opts.workers} loader workers, {opts.threads} "
              f"threads; median of {opts.rounds} rounds of {opts.steps} steps, samples/s:")
        for name, rate in median.items():
            print(f"  {name:>9}: {rate:8.1f}   (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})")
        print(f"  streamed / map-style: {median['streamed'] / median['map-style']:.3f}")


if __name__ == "__main__":
    main()
