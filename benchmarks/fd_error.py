"""How far the finite-difference second order (`fd`) lands from exact double backward, by step size.

Relative error ||g_fd - g_exact|| / ||g_exact|| of the full MLTP gradient, for the forward (one extra
pass) and central (two) schemes over a grid of `fd_eps`, in float32 and under bf16 autocast (where the
reference is the float32 exact gradient, and bf16 exact is shown for scale). Smooth timm models only: on
ReLU networks the gradient jumps at kinks and no step size converges (see README). Dropout and drop path
on, same seed for every call, so all passes see the same masks.

    python benchmarks/fd_error.py [--models test_efficientnet,test_convnext]
"""
import argparse
import copy

import timm
import torch
import torch.nn.functional as F

from timm_mltp import MLTPConfig, mltp_backward, split_tasks

EPS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def gradient(model, state, cfg, tasks, bf16=False):
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mltp_backward(model, *tasks, lambda m, b: F.cross_entropy(m(b[0]), b[1]), cfg, alpha=0.05)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="test_efficientnet,test_convnext")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    tasks = split_tasks((torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, drop_rate=0.3, drop_path_rate=0.2).train()
        state = copy.deepcopy(model.state_dict())
        exact = gradient(model, state, MLTPConfig("full", second_order="exact"), tasks)
        fo = gradient(model, state, MLTPConfig("fo"), tasks)

        def error(g):
            return f"{((g - exact).norm() / exact.norm()).item():.2e}"

        print(f"\n{name}: relative error vs float32 exact (first order `fo` for scale: {error(fo)})")
        print("| fd_eps | forward, fp32 | central, fp32 |")
        print("| --- | --- | --- |")
        for eps in EPS:
            row = [error(gradient(model, state, MLTPConfig("full", second_order="fd", fd_scheme=s, fd_eps=eps),
                                  tasks)) for s in ("forward", "central")]
            print(f"| {eps:g} | {row[0]} | {row[1]} |")
        bf16_exact = gradient(model, state, MLTPConfig("full", second_order="exact"), tasks, bf16=True)
        bf16_fd = gradient(model, state, MLTPConfig("full", second_order="fd"), tasks, bf16=True)
        print(f"bf16 autocast: exact {error(bf16_exact)}, fd (default: float32 central passes) {error(bf16_fd)}")


if __name__ == "__main__":
    main()
