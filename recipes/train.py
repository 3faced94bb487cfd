#!/usr/bin/env python3
"""Train or fine-tune any timm model with MLTP on a `datasets` image dataset.

    python recipes/train.py                                      # shipped Fashion-MNIST subset, ~2 min on 2 CPU cores
    accelerate launch recipes/train.py --model resnet50 --variant conv --dataset uoft-cs/cifar100

Options are timm train.py's where timm has them; -b/--batch-size is the size of ONE task, so each
optimizer step uses 2 x batch-size samples per process. The loop lives in timm_mltp/engine.py.
"""
import argparse
import sys

from timm_mltp.engine import TrainArgs, train
from timm_mltp.errors import MLTPConfigError
from timm_mltp.mltp import ALPHA_RULES

D = TrainArgs()


def parse_args(argv=None) -> TrainArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=D.model, help="timm model name (default: %(default)s)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    g.add_argument("--pretrained-path", default=None, help="local weights file; the head is re-initialised "
                                                           "when --num-classes differs")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    g.add_argument("--img-size", type=int, default=None, help="default: the model's (32 on the shipped data)")
    g.add_argument("--drop", dest="drop_rate", type=float, default=D.drop_rate, help="dropout rate")
    g.add_argument("--drop-path", dest="drop_path_rate", type=float, default=None, help="drop path rate")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="hub id or local path datasets can load "
                                                   "(default: the shipped Fashion-MNIST subset)")
    g.add_argument("--image-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--train-split", default=None)
    g.add_argument("--eval-split", default=None)
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--scale", type=float, nargs=2, default=D.scale, help="random-resized-crop area range")
    g.add_argument("--hflip", type=float, default=D.hflip)
    g.add_argument("-j", "--workers", type=int, default=None, help="data loader processes (default: 4 with a "
                                                                   "GPU, 0 on the CPU)")
    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, default=D.batch_size, help="size of one task (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=D.epochs)
    g.add_argument("--opt", default=D.opt, help="timm optimizer name (default: %(default)s)")
    g.add_argument("--lr", type=float, default=D.lr)
    g.add_argument("--momentum", type=float, default=D.momentum)
    g.add_argument("--weight-decay", type=float, default=D.weight_decay)
    g.add_argument("--sched", default=D.sched, help="timm scheduler name (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=int, default=D.warmup_epochs)
    g.add_argument("--smoothing", type=float, default=D.smoothing, help="label smoothing")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g = p.add_argument_group("MLTP")
    g.add_argument("--variant", default=D.variant, help="none | full | conv | fc | fo | head | glob patterns "
                                                        "over parameter names, e.g. 'layer4.*,fc.*' (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=D.gamma, help="weight of task j, in (0, 1]")
    g.add_argument("--alpha-rule", default=None, choices=ALPHA_RULES,
                   help="how the inner step size is chosen each step (default: fixed with --alpha, else optimizer)")
    g.add_argument("--alpha", type=float, default=None, help="rule fixed: the inner step size")
    g.add_argument("--alpha-scale", type=float, default=D.alpha_scale,
                   help="rules lr, clip, update: multiplies their step (default: %(default)s)")
    g.add_argument("--relative-step", type=float, default=D.relative_step,
                   help="rule relative: ||inner step|| / ||w_S|| (default: %(default)s)")
    g.add_argument("--second-order", default=D.second_order, choices=["auto", "exact", "fd"])
    g.add_argument("--bn-update", default=D.bn_update, choices=["both", "first"])
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--log-interval", type=int, default=D.log_interval)
    g.add_argument("--output", default=D.output, help="files go to OUTPUT/EXPERIMENT")
    g.add_argument("--experiment", default=None)
    g.add_argument("--resume", default=None, help="checkpoint to resume from")
    g.add_argument("--checkpoint-interval", type=int, default=D.checkpoint_interval,
                   help="also write last.pth.tar every N optimizer steps")
    g.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    g.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    ns = p.parse_args(argv)
    ns.scale = tuple(ns.scale)
    return TrainArgs(**vars(ns))


def main(argv=None) -> int:
    try:
        train(parse_args(argv))
    except MLTPConfigError as e:  # bad input: say what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
