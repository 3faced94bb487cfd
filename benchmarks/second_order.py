"""How far `fd` lands from exact double backward, per model family, what the kink detector measures, and
what `auto` does with it.

For each model, from the same weights, batch and seed (float32, 32x32 images, 2 x 8 samples, variant
`full`, alpha 0.05, optionally after some SGD steps):

- gradient: ||g_fd - g_exact|| / ||g_exact|| of the whole MLTP gradient (fd forward, its default step),
  and first-order `fo` for scale (how large the second-order term is);
- second-order term: ||gamma (H_i v by fd - H_i v exact)|| / ||gamma H_i v exact||, what `auto` compares
  with FD_TOLERANCE;
- detector: ||H_i v forward - H_i v central|| / ||H_i v central||, what fd alone compares with
  KINK_TOLERANCE (`auto` where exact is unavailable, and `second_order="fd"`);
- double backward: `native` where the model has one as it is, `replacements` where it needs
  `timm_mltp.double_backward` (math attention, composite hard-swish), which `exact` always runs inside;
- auto: what accuracy allows (`exact`, or `fd if faster`: `auto` then keeps fd where one warm fd step takes
  less than FD_SPEEDUP times one exact step), and with --timing what it picked on this machine.

    python benchmarks/second_order.py [--models test_resnet,resnet18,...] [--sgd-steps 30] [--timing]
"""
import argparse
import copy
import logging

import timm
import torch
import torch.nn.functional as F

from timm_mltp import MLTPConfig, mltp_backward, second_order_check, split_tasks
from timm_mltp.mltp import FD_SPEEDUP, FD_TOLERANCE, KINK_TOLERANCE

MODELS = ("test_resnet,resnet18,regnetx_002,mobilenetv3_small_050,test_efficientnet,efficientnet_b0,mixnet_s,"
          "test_convnext,convnext_atto,test_byobnet,test_vit,vit_tiny_patch16_224,test_maxvit,bert_tiny")
# what each family computes through: where fd steps across kinks
NONLINEARITIES = {"test_resnet": "ReLU, max-pool", "resnet18": "ReLU, max-pool", "regnetx_002": "ReLU",
                  "vgg11": "ReLU, max-pool", "mobilenetv3_small_050": "hard-swish, hard-sigmoid, ReLU",
                  "test_efficientnet": "SiLU", "efficientnet_b0": "SiLU", "mixnet_s": "ReLU, SiLU",
                  "test_convnext": "GELU, LayerNorm", "convnext_atto": "GELU, LayerNorm", "test_byobnet": "ReLU",
                  "test_vit": "GELU, attention", "vit_tiny_patch16_224": "GELU, attention",
                  "test_maxvit": "GELU, attention", "bert_tiny": "GELU, attention"}
SIZES = {"vit_tiny_patch16_224": dict(img_size=32), "test_maxvit": dict(img_size=64)}


def image_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SIZES.get(name, {})).train()
    size = SIZES.get(name, {}).get("img_size", 32)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g))
    return model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def bert_tiny():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=4)).train()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 48, (16, 8), generator=g),
             "attention_mask": torch.ones(16, 8, dtype=torch.long), "labels": torch.randint(0, 4, (16,), generator=g)}
    return model, batch, lambda m, b: m(**b).loss


def build(name, sgd_steps):
    model, batch, loss_fn = bert_tiny() if name == "bert_tiny" else image_model(name)
    if sgd_steps:   # away from init (timm zero-initialises the last BatchNorm of each residual block)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(sgd_steps):   # on other batches: the measured one is not fitted
            opt.zero_grad()
            loss_fn(model, shuffled(batch, step)).backward()
            opt.step()
    return model, split_tasks(batch), loss_fn


def shuffled(batch, seed):
    """Another batch like `batch`: its inputs and labels, each permuted its own way."""
    g = torch.Generator().manual_seed(1000 + seed)
    if isinstance(batch, dict):
        return {k: v[torch.randperm(len(v), generator=g)] for k, v in batch.items()}
    return tuple(v[torch.randperm(len(v), generator=g)] for v in batch)


def gradient(model, state, tasks, loss_fn, cfg):
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    stats = mltp_backward(model, *tasks, loss_fn, cfg, alpha=0.05)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats


def double_backward(model, tasks, loss_fn):
    """Whether the model as it is has a double backward (outside `mltp_backward` and its replacements)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, tasks[0]), params, create_graph=True)
    try:
        torch.autograd.grad(sum(g.sum() for g in grads), params, allow_unused=True)
        return "native"
    except (RuntimeError, NotImplementedError):
        return "replacements"


def row(name, sgd_steps, timing):
    model, tasks, loss_fn = build(name, sgd_steps)
    state = copy.deepcopy(model.state_dict())
    exact, _ = gradient(model, state, tasks, loss_fn, MLTPConfig("full", second_order="exact"))
    fd, _ = gradient(model, state, tasks, loss_fn, MLTPConfig("full", second_order="fd"))
    fo, _ = gradient(model, state, tasks, loss_fn, MLTPConfig("fo"))
    fresh = copy.deepcopy(model)       # a model `auto` has not seen
    _, stats = gradient(fresh, state, tasks, loss_fn, MLTPConfig("full"))
    check = second_order_check(fresh, MLTPConfig("full"))

    def error(g):
        return f"{((g - exact).norm() / exact.norm()).item():.1e}"

    verdict = "fd if faster" if check.fd_accurate else "exact"
    cells = [name, NONLINEARITIES.get(name, ""), double_backward(model, tasks, loss_fn), error(fd), error(fo),
             f"{check.fd_error:.1e}",
             f"{check.disagreement:.1e}" + (" **kinked**" if check.kinked else ""), verdict]
    if timing:
        timing = f"fd {check.fd_seconds * 1e3:.0f} ms, exact {check.exact_seconds * 1e3:.0f} ms"
        cells.append(f"{stats.second_order} ({timing})")
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--sgd-steps", type=int, default=0, help="train this many SGD steps on the batch first")
    parser.add_argument("--timing", action="store_true", help="also show what auto picked here, and its timings")
    args = parser.parse_args()
    logging.getLogger("timm_mltp").setLevel(logging.ERROR)    # the table says it all
    print(f"float32, 32x32, 2 x 8 samples, variant full, alpha 0.05, {args.sgd_steps} SGD steps; "
          f"FD_TOLERANCE {FD_TOLERANCE:g}, KINK_TOLERANCE {KINK_TOLERANCE:g}, FD_SPEEDUP {FD_SPEEDUP:g}\n")
    header = ["model", "nonlinearities", "double backward", "fd vs exact, gradient", "fo vs exact",
              "fd vs exact, 2nd-order term", "detector: forward vs central", "auto"]
    if args.timing:
        header.append("auto here")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name in args.models.split(","):
        print(row(name, args.sgd_steps, args.timing), flush=True)


if __name__ == "__main__":
    main()
