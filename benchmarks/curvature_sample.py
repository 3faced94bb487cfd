"""What curvature from a sample of task i (`curvature_fraction` rho, issue 17) costs in accuracy of the gradient.

For each model, from the same weights and batch (float32, 32x32 images, 2 x 32 samples, variant `full`,
exact second order, alpha 0.05, after a few SGD steps so that the model is not at its initialisation), the
MLTP gradient at rho = 1 against the one at rho in {1/2, 1/4, 1/8}, over several draws of the sample:

- gradient: ||g_rho - g_1|| / ||g_1|| and cos(g_rho, g_1) of the whole MLTP gradient (what the optimizer gets);
- term: ||T_rho - T_1|| / ||T_1|| of the second-order term T = g_fo - g_exact (the part the sample estimates);
- share: ||T_1|| / ||g_1||, how much of the gradient the term is (the gradient error is about share x term error).

Mean ± std over the draws. Accuracy only, no timing (benchmarks/step_cost.py times the rows):

    python benchmarks/curvature_sample.py [--models test_resnet,...] [--draws 8]
"""
from __future__ import annotations

import argparse
import statistics

import timm
import torch
import torch.nn.functional as F

from timm_mltp import MLTPConfig, mltp_backward, split_tasks

# with and without BatchNorm: BatchNorm ResNet/EfficientNet/RegNet, LayerNorm ConvNeXt/ViT
MODELS = "test_resnet,resnet18,test_efficientnet,regnetx_002,test_convnext,test_vit"
FRACTIONS = (0.5, 0.25, 0.125)
MODEL_KWARGS = {"test_vit": {"img_size": 32, "patch_size": 4}}
ALPHA, BATCH, WARM_STEPS = 0.05, 32, 5


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def setup(name: str):
    """The model after a few SGD steps on random data, and one batch of 2 tasks."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **MODEL_KWARGS.get(name, {})).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(WARM_STEPS):
        x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        opt.zero_grad()
        ce(model, (x, y)).backward()
        opt.step()
    batch = (torch.randn(2 * BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (2 * BATCH,), generator=g))
    return model, batch


def gradient(model, batch, variant: str, rho: float = 1.0, seed: int = 0) -> torch.Tensor:
    """The MLTP gradient, flat; buffers restored so that every call starts from the same state."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    cfg = MLTPConfig(variant=variant, second_order="exact", curvature_fraction=rho)
    mltp_backward(model, *split_tasks(batch), ce, cfg, alpha=ALPHA)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fmt(values: list[float], spec: str = ".3f") -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{spec}} ± {std:{spec}}"


def measure(name: str, draws: int) -> list[str]:
    model, batch = setup(name)
    exact, first_order = gradient(model, batch, "full"), gradient(model, batch, "fo")
    term = first_order - exact
    rows = []
    for rho in FRACTIONS:
        grads = [gradient(model, batch, "full", rho, seed) for seed in range(draws)]
        g_err = [rel(g, exact) for g in grads]
        cos = [float(torch.nn.functional.cosine_similarity(g, exact, dim=0)) for g in grads]
        t_err = [rel(first_order - g, term) for g in grads]
        rows.append(f"| {name} | 1/{round(1 / rho)} | {fmt(g_err)} | {fmt(cos, '.4f')} | {fmt(t_err)} | "
                    f"{float(term.norm() / exact.norm()):.3f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=MODELS)
    p.add_argument("--draws", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"B = {BATCH} per task, alpha {ALPHA}, variant full, exact; mean ± std over {args.draws} draws\n")
    print("| model | rho | gradient rel. error | gradient cosine | term rel. error | term share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        for row in measure(name, args.draws):
            print(row, flush=True)


if __name__ == "__main__":
    main()
