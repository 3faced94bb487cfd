"""What a Hessian-vector product costs, four ways, and the MLTP step each would allow (issue 9, item 3).

`full`/`exact` needs H_i v with v = alpha P_S g_j(w'), known only after the passes on both tasks. Timed
per call on task i (B samples), as a multiple of one standard forward + backward on the same batch:

    reverse-over-reverse   forward, grad with create_graph, grad of <grad, v>       what `exact` does
    ... conv rewritten     the same, with convolution's double backward written as
                           plain convolution / convolution_backward calls
    forward-over-reverse   torch.func.jvp of torch.func.grad (Pearlmutter's R-operator), a fresh pass
    finite difference      grad at w + r v (one more forward + backward)          what `fd` does

and the MLTP step per sample that follows (task j's forward + backward is one more standard pass):
reverse-over-reverse reuses task i's pass and fd's product includes it, (1 + HVP) / 2; forward-over-reverse
starts over once v is known, (2 + HVP) / 2. The vector arithmetic of the step is left out: a floor.
The four products are checked against each other before timing (the fd one only on smooth models).

    python benchmarks/hvp_cost.py                    # resnet18 and test_resnet, 32x32, B=32, CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.overrides import TorchFunctionMode

_conv_backward = torch.ops.aten.convolution_backward


def _conv_grads(gy, x, weight, conf, mask):
    stride, padding, dilation, groups = conf
    return _conv_backward(gy, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask)


class _InputGrad(torch.autograd.Function):
    """d conv(x, W) / dx applied to gy, differentiable in gy and W by ordinary convolutions."""

    @staticmethod
    def forward(ctx, gy, weight, x_shape, conf):
        ctx.save_for_backward(gy, weight)
        ctx.conf = conf
        return _conv_grads(gy, gy.new_empty(x_shape), weight, conf, [True, False, False])[0]

    @staticmethod
    def backward(ctx, u):
        gy, weight = ctx.saved_tensors
        d_gy = F.conv2d(u, weight, None, *ctx.conf)
        d_weight = _conv_grads(gy, u, weight, ctx.conf, [False, True, False])[1]
        return d_gy, d_weight, None, None


class _WeightGrad(torch.autograd.Function):
    """d conv(x, W) / dW applied to gy, differentiable in gy and x by ordinary convolutions."""

    @staticmethod
    def forward(ctx, gy, x, w_shape, conf):
        ctx.save_for_backward(gy, x)
        ctx.conf = conf
        return _conv_grads(gy, x, x.new_empty(w_shape), conf, [False, True, False])[1]

    @staticmethod
    def backward(ctx, v):
        gy, x = ctx.saved_tensors
        d_gy = F.conv2d(x, v, None, *ctx.conf)
        d_x = _conv_grads(gy, x, v, ctx.conf, [True, False, False])[0]
        return d_gy, d_x, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = _InputGrad.apply(gy, weight, x.shape, ctx.conf)
        gw = _WeightGrad.apply(gy, x, weight.shape, ctx.conf)
        return gx, gw, gy.sum((0, 2, 3)) if ctx.has_bias else None, None


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class _ConvRewritten(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        # nn.Conv2d calls F.conv2d with its 7 arguments in order; any other call runs as it is
        if func is F.conv2d and len(args) == 7 and not kwargs and not isinstance(args[4], str):
            x, weight, bias, stride, padding, dilation, groups = args
            return _Conv2d.apply(x, weight, bias, (_pair(stride), _pair(padding), _pair(dilation), groups))
        return func(*args, **(kwargs or {}))


def products(model, x, y):
    """name -> (fn(v) -> H v, whether it reuses task i's pass)."""
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss():
        return F.cross_entropy(model(x), y)

    def reverse_over_reverse(v):
        g = torch.autograd.grad(loss(), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=v)

    def conv_rewritten(v):
        with _ConvRewritten():
            return reverse_over_reverse(v)

    def functional_loss(w):     # BatchNorm's running statistics on copies: a transform may not write its inputs
        state = {**{k: b.clone() for k, b in buffers.items()}, **dict(zip(names, w))}
        return F.cross_entropy(functional_call(model, state, (x,)), y)

    def forward_over_reverse(v):
        return jvp(grad(functional_loss), (tuple(p.detach() for p in params),), (tuple(v),))[1]

    def finite_difference(v, eps=1e-3):
        r = eps * torch.stack([p.detach().norm() for p in params]).norm() / torch.stack([t.norm() for t in v]).norm()
        g = torch.autograd.grad(loss(), params)
        shifted = [(p.detach() + r * t).requires_grad_() for p, t in zip(params, v)]
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, shifted))):
            g_r = torch.autograd.grad(loss(), shifted)
        return [(a - b) / r for a, b in zip(g_r, g)]

    return {"reverse-over-reverse (exact)": (reverse_over_reverse, True),
            "... conv rewritten": (conv_rewritten, True),
            "forward-over-reverse": (forward_over_reverse, False),
            "finite difference (fd)": (finite_difference, True)}   # its pass at w is task i's


def relative_error(a, b) -> float:
    return float(sum(((p - q) ** 2).sum() for p, q in zip(a, b)).sqrt() / sum((q ** 2).sum() for q in b).sqrt())


def measure(name: str, img_size: int, batch_size: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x, y = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 10, (batch_size,))
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    fns = products(model, x, y)

    model.eval()                                # fixed normalisation while the products are compared
    reference = fns["reverse-over-reverse (exact)"][0](v)
    agree = {label: relative_error(fn(v), reference) for label, (fn, _) in fns.items()}
    model.train()

    def standard():
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    timed = {"standard forward + backward": standard, **{k: (lambda f=f: f(v)) for k, (f, _) in fns.items()}}
    seconds = {k: [] for k in timed}
    for fn in timed.values():
        fn()                                    # warm
    for _ in range(repeats):                    # interleaved: machine noise hits every row alike
        for label, fn in timed.items():
            start = time.perf_counter()
            fn()
            seconds[label].append(time.perf_counter() - start)
    base = statistics.median(seconds["standard forward + backward"])
    print(f"\n{name}, {img_size}x{img_size}, B={batch_size}, {torch.get_num_threads()} thread(s)")
    print("| product | ms | x forward+backward | MLTP full step per sample (floor) | vs exact's |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| standard forward + backward | {base * 1e3:.1f} | 1.00 | | |")
    for label, (_, reuses) in fns.items():
        t = statistics.median(seconds[label]) / base
        step = (1 + t) / 2 if reuses else (2 + t) / 2
        print(f"| {label} | {t * base * 1e3:.1f} | {t:.2f} | {step:.2f}x | {agree[label]:.1e} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,test_resnet")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    for name in args.models.split(","):
        measure(name, args.img_size, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
