"""Cost of one MLTP step per training sample, relative to standard training.

Standard training: one forward/backward on a batch of B. MLTP: `mltp_backward` on two batches of B
(task i and task j). Ratio = (t_mltp / 2B) / (t_standard / B). Row "standard on 2B" is one forward/backward
on both tasks at once: below 1.00x where a pass's cost grows less than its batch (small images on a CPU,
where each layer's cost is mostly its weights'), the peak memory an MLTP step is compared with. All rows of a model are timed
interleaved in one process, so machine noise hits them alike; medians over repeats. Rows "rho 1/k" take
H_i v on a random k-th of task i (curvature_fraction). Peak memory per row: on CUDA the most allocated
during the step (torch.cuda.max_memory_allocated); on the CPU the process's peak resident set, which only
grows, so the column says how far each row raised it in the first repeat.

    python benchmarks/step_cost.py                      # resnet18 and test_resnet, 32x32, B=32
    python benchmarks/step_cost.py --models resnet50,vit_tiny_patch16_224,mobilenetv3_small_050
    python benchmarks/step_cost.py --models resnet50 --img-size 224 --batch-size 64 --device cuda
    python benchmarks/step_cost.py --models resnet50 --rows "rho"        # the curvature_fraction rows only
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

from timm_mltp import MLTPConfig, MLTPConfigError, mltp_backward

STANDARD_2B = "standard on 2B"   # one forward/backward on both tasks at once: the same samples as an MLTP step
ROWS = [  # (label, config); None is standard training on B, STANDARD_2B on 2B
    ("standard", None),
    (STANDARD_2B, STANDARD_2B),
    ("none", MLTPConfig("none")),
    ("fo", MLTPConfig("fo")),
    ("fc, auto", MLTPConfig("fc")),
    ("conv, auto", MLTPConfig("conv")),
    ("full, fd", MLTPConfig("full", second_order="fd")),
    ("full, fd central", MLTPConfig("full", second_order="fd", fd_scheme="central")),
    ("full, exact", MLTPConfig("full", second_order="exact")),
    *((f"full, {method}, rho 1/{k}", MLTPConfig("full", second_order=method, curvature_fraction=1 / k))
      for method in ("exact", "fd") for k in (2, 4, 8)),
    ("conv, exact", MLTPConfig("conv", second_order="exact")),
    ("conv, exact, rho 1/4", MLTPConfig("conv", second_order="exact", curvature_fraction=1 / 4)),
]


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FP16_LOSS_SCALE = 2.0 ** 16   # GradScaler's initial scale: fp16 runs scale the loss as training would


def peak_rss() -> int:
    """The process's peak resident set so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def step(model, cfg, task_i, task_j, device, amp: str = "no"):
    """One timed step (autocast in bf16/fp16 where asked); returns (seconds, peak bytes: CUDA's most allocated
    during the step, or the process's peak RSS after it on the CPU)."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scale = FP16_LOSS_SCALE if amp == "fp16" else 1.0
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp),
                              enabled=amp != "no")
    sync(device)
    start = time.perf_counter()
    with autocast:
        if cfg is None:
            loss = ce(model, task_i) * scale
        elif cfg == STANDARD_2B:
            loss = ce(model, [torch.cat(parts) for parts in zip(task_i, task_j)]) * scale
        else:
            mltp_backward(model, task_i, task_j, ce, cfg, alpha=0.01, loss_scale=scale)
    if cfg is None or cfg == STANDARD_2B:
        loss.backward()      # outside autocast, as in training
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def selected_rows(pattern: str | None):
    """ROWS whose label contains one of the comma-separated parts of `pattern` (all where None); standard
    training always, as the base."""
    if not pattern:
        return ROWS
    labels = [label for label, _ in ROWS]
    if pattern.strip() in labels:      # a whole label: that row alone (labels contain commas)
        return [(label, cfg) for label, cfg in ROWS if cfg is None or label == pattern.strip()]
    parts = [p.strip() for p in pattern.split(",")]
    return [(label, cfg) for label, cfg in ROWS if cfg is None or any(p in label for p in parts)]


def measure(name, args, device):
    torch.manual_seed(0)
    try:   # models whose weights depend on the input size (ViT position embeddings) are built at it
        model = timm.create_model(name, num_classes=10, img_size=args.img_size)
    except TypeError:
        model = timm.create_model(name, num_classes=10)
    model = model.to(device).train()
    b, s = args.batch_size, args.img_size
    task_i = (torch.randn(b, 3, s, s, device=device), torch.randint(0, 10, (b,), device=device))
    task_j = (torch.randn(b, 3, s, s, device=device), torch.randint(0, 10, (b,), device=device))
    rows = selected_rows(args.rows)
    times = {label: [] for label, _ in rows}
    peaks = {label: 0 for label, _ in rows}
    start_rss = peak_rss()
    unavailable = {}   # label -> why the row cannot run on this model (e.g. no double backward)
    for rep in range(args.warmup + args.repeats):
        for label, cfg in rows:
            if label in unavailable:
                continue
            try:
                seconds, peak = step(model, cfg, task_i, task_j, device, args.amp)
            except MLTPConfigError as e:
                unavailable[label] = str(e).split(" (")[0]
                continue
            if device.type == "cpu" and rep == 0:       # the first pass in row order raises the peak RSS
                peaks[label], start_rss = peak - start_rss, peak
            elif device.type == "cuda" and rep >= args.warmup:
                peaks[label] = max(peaks[label], peak)
            if rep >= args.warmup:
                times[label].append(seconds)
    base = statistics.median(times["standard"]) / b
    print(f"\n{name}, {s}x{s}, B={b}, {device.type}, {args.amp if args.amp != 'no' else 'float32'}, "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.repeats}; standard: {1e3 * base * b:.1f} ms per step of B")
    memory = "peak MiB allocated" if device.type == "cuda" else "peak RSS raised by, MiB (first repeat)"
    print(f"| variant | per-sample cost vs standard | ms per MLTP step (2B) | {memory} |")
    print("| --- | --- | --- | --- |")
    for label, cfg in rows:
        if label in unavailable:
            print(f"| {label} | unavailable: {unavailable[label]} | | |")
            continue
        per_sample = statistics.median(times[label]) / (b if cfg is None else 2 * b)
        print(f"| {label} | {per_sample / base:.2f}x | {1e3 * statistics.median(times[label]):.1f} | "
              f"{peaks[label] / 2**20:.0f} |")
    if device.type == "cpu":   # with one row besides standard (--rows), the row's own peak
        print(f"process peak RSS: {peak_rss() / 2**20:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,test_resnet")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="B, the size of one task")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype of every row")
    parser.add_argument("--rows", default=None, help="only rows whose label contains one of these comma-separated "
                                                     "parts, e.g. 'exact,fo', or one whole label, e.g. 'full, exact' "
                                                     "(standard training always runs); on the CPU one row per "
                                                     "process gives each its own peak RSS")
    args = parser.parse_args()
    for name in args.models.split(","):
        measure(name.strip(), args, torch.device(args.device))


if __name__ == "__main__":
    main()
