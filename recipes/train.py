#!/usr/bin/env python3
"""Train or fine-tune any timm model with MLTP on a `datasets` image dataset.

    python recipes/train.py                                      # shipped Fashion-MNIST subset, about 2 min on 2 CPU cores
    accelerate launch recipes/train.py --model resnet50 --variant conv --dataset hfds/uoft-cs/cifar100
    python recipes/train.py -c output/train/RUN/args.yaml --epochs 10    # a run's options again, one changed

Exit codes: 0 done; 2 bad input, unreadable data or a failed checkpoint write (one line, no traceback); 75 stopped
by SIGTERM/SIGUSR1 after saving last.pth.tar (run the same command with --resume it; timm_mltp.preemption).

Options are timm train.py's, by name and meaning; -b/--batch-size is the size of ONE task, so each
optimizer step uses 2 x batch-size samples per process (times --grad-accum-steps). timm options this
recipe does not support stop with a one-line reason (docs/recipe.md: the option table). The loop lives in
timm_mltp/engine.py.
"""
import argparse
import sys

import yaml
from timm.utils import ParseKwargs

from timm_mltp.engine import TrainArgs, train
from timm_mltp.errors import MLTPConfigError
from timm_mltp.launch import end_process
from timm_mltp.mltp import ALPHA_RULES
from timm_mltp.preemption import PREEMPTED_EXIT_CODE, Preempted

D = TrainArgs()

# timm train.py options this recipe refuses: flag -> (timm's default, why). A `-c` YAML file may hold them
# at timm's default (timm's own args.yaml holds every option), not at another value.
_SPLITS = ("augmentation splits put several views of each sample in one batch; MLTP's tasks are the batch's "
           "two halves, so the views would straddle task i and task j")
_SCHEDULED = "scheduled resolutions and batch sizes need timm's own loader; this recipe trains at one input size"
_NAFLEX = ("NaFlex batches are variable-length patch sequences from timm's NaFlex loader; this recipe's tasks "
           "are image tensors")
_KD = "knowledge distillation is another training task (timm.task); this recipe trains the classifier with MLTP"
_LR_BASE = ("give --lr: timm scales a base lr by the global batch, and an MLTP step's batch (two tasks of B) "
            "makes that rule a choice this recipe does not make for you")
REFUSED = {
    "--val-num-samples": (None, "sizes timm's iterable datasets; a `datasets` split knows its size"),
    "--class-map": ("", "labels come from the dataset's label column (ClassLabel names or integer ids)"),
    "--input-img-mode": (None, "images are converted to RGB, or to L for a 1-channel model (--in-chans 1)"),
    "--dataset-trust-remote-code": (False, "datasets >= 4 no longer runs dataset scripts; use a dataset stored "
                                           "as parquet/arrow, or an imagefolder"),
    "--fuser": ("", "selects a TorchScript fuser; this recipe does not script models"),
    "--torchscript": (False, "MLTP evaluates the model at w' by swapping its parameters, which a scripted module "
                             "does not allow; use --torchcompile"),
    "--device": ("cuda", "Accelerate places the model: use --cpu, CUDA_VISIBLE_DEVICES or accelerate launch"),
    "--model-dtype": (None, "MLTP's second order needs float32 weights (the fd difference vanishes in low "
                            "precision); use --amp / --mixed-precision bf16"),
    "--device-modules": (None, "devices come from Accelerate"),
    "--lr-base": (0.1, _LR_BASE),
    "--lr-base-size": (256, _LR_BASE),
    "--lr-base-scale": ("", _LR_BASE),
    "--epoch-repeats": (0.0, "repeats timm's iterable datasets; --epochs counts passes over the training split"),
    "--start-epoch": (None, "use --resume, which restores the epoch, step and schedule exactly"),
    "--aug-repeats": (0, "repeated augmentation puts copies of one image in one batch, so task i and task j "
                         "would share samples"),
    "--aug-splits": (0, _SPLITS),
    "--jsd-loss": (False, _SPLITS),
    "--resplit": (False, _SPLITS),
    "--split-bn": (False, _SPLITS),
    "--drop-connect": (None, "deprecated in timm; use --drop-path"),
    "--sync-bn": (False, "each process's tasks are local (SPEC), and synchronized BatchNorm would take task i's "
                         "statistics over every process"),
    "--dist-bn": ("reduce", "BatchNorm buffers follow process 0 after every step, as DDP broadcasts them; "
                            "--no-ddp-bb keeps each process's own"),
    "--worker-seeding": ("all", "each sample's augmentation is seeded by (seed, epoch, index), so a run resumes "
                                "exactly with any number of workers"),
    "--tta": (0, "test-time augmentation needs timm's TTA loader; evaluate checkpoints with timm's validate.py"),
    "--use-multi-epochs-loader": (False, "loader workers restart every epoch to see its augmentation seed "
                                         "(exact resume)"),
    "--train-img-sizes": (None, _SCHEDULED),
    "--train-batch-sizes": (None, _SCHEDULED),
    "--train-size-probs": (None, _SCHEDULED),
    "--train-size-schedule": ("constant", _SCHEDULED),
    "--train-size-schedule-spread": (0.65, _SCHEDULED),
    "--train-size-random-mix": (0.1, _SCHEDULED),
    "--train-batches-per-epoch": (None, _SCHEDULED),
    "--variable-batch-loss-scale": ("none", _SCHEDULED),
    "--naflex-loader": (False, _NAFLEX),
    "--naflex-train-seq-lens": ([128, 256, 576, 784, 1024], _NAFLEX),
    "--naflex-max-seq-len": (576, _NAFLEX),
    "--naflex-patch-sizes": (None, _NAFLEX),
    "--naflex-patch-size-probs": (None, _NAFLEX),
    "--naflex-loss-scale": ("linear", _NAFLEX),
    "--naflex-patchify-channels-first": (False, _NAFLEX),
    "--kd-model-name": (None, _KD),
    "--kd-distill-type": ("logit", _KD),
    "--kd-loss-type": ("kl", _KD),
    "--distill-loss-weight": (None, _KD),
    "--task-loss-weight": (None, _KD),
    "--kd-temperature": (4.0, _KD),
    "--kd-student-feature-dim": (None, _KD),
    "--kd-teacher-feature-dim": (None, _KD),
    "--kd-token-distill-type": ("soft", _KD),
}
# timm options accepted for timm's command lines that change nothing here: flag -> why
NO_EFFECT = {
    "--dataset-download": "datasets downloads hub datasets whenever it is online",
    "--no-prefetcher": "the loader normalises images on the CPU, as timm does with --no-prefetcher",
    "--synchronize-step": "the loop reads every step's loss, which synchronises anyway",
    "--local_rank": "set by launchers; Accelerate reads LOCAL_RANK",
}
# timm's name -> this recipe's TrainArgs field, where they differ
ALIASES = {"val_split": "eval_split", "input_key": "image_column", "target_key": "label_column",
           "drop": "drop_rate", "drop_path": "drop_path_rate", "drop_block": "drop_block_rate"}
AMP_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class ArgumentParser(argparse.ArgumentParser):
    """Bad command lines end in one line naming what was wrong (main prints it), not a usage dump."""

    def error(self, message):
        raise MLTPConfigError(f"{message} (python recipes/train.py --help lists the options)")


class Refused(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise MLTPConfigError(f"{option_string} (a timm train.py option) is not supported by this recipe: "
                              f"{REFUSED[self.option_strings[0]][1]}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help line ends with its default, so that --help alone answers "what happens if I leave it"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _fill_help(parser: ArgumentParser) -> None:
    """timm's options without a help line of their own mean what they mean in timm's train.py; saying so lets the
    formatter show their default."""
    for action in parser._actions:
        if action.help is None:
            action.help = "as in timm's train.py"


def _mltp_options(p: ArgumentParser) -> None:
    """The MLTP group, first in --help: the options this recipe adds to timm's."""
    g = p.add_argument_group("MLTP (the method; timm's own options follow)")
    g.add_argument("--variant", default=D.variant,
                   help="parameters the inner step moves: full | conv | fc | head | glob patterns over parameter "
                        "names, e.g. 'layer4.*,fc.*' (exact second order, 2-3x a standard step on a CPU); fo (first "
                        "order, about 1.0-1.3x): take it when the step's cost matters; none: standard training "
                        "through the same code, the baseline (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=D.gamma,
                   help="weight of task j, in (0, 1]; 0.5 keeps the loss on ordinary training's scale, so learning "
                        "rates carry over: change it to study the method (default: %(default)s)")
    g.add_argument("--alpha-rule", default=None, choices=ALPHA_RULES,
                   help="how the inner step size is set each step; optimizer makes it one real step of your "
                        "optimizer, and is the rule to keep; lr reproduces old runs, the others are experiments "
                        "(docs/method.md) (default: fixed with --alpha, else optimizer)")
    g.add_argument("--alpha", type=float, default=None,
                   help="a fixed inner step size; giving it selects rule fixed (default: none, the rule decides)")
    g.add_argument("--alpha-scale", type=float, default=D.alpha_scale,
                   help="rules lr, clip, update, preconditioned, optimizer: multiplies their step; online: its "
                        "starting factor; change it for an inner step shorter or longer than a real step "
                        "(default: %(default)s)")
    g.add_argument("--relative-step", type=float, default=D.relative_step,
                   help="rule relative only: ||inner step|| / ||w_S|| (default: %(default)s)")
    g.add_argument("--second-order", default=D.second_order, choices=["auto", "exact", "fd"],
                   help="exact (double backward), fd (finite differences of gradients, no double backward) or "
                        "auto (exact wherever double backward works, fd otherwise, with a check for kinks); force "
                        "exact or fd only to compare them (default: %(default)s)")
    g.add_argument("--auto-timing", action="store_true",
                   help="--second-order auto: also time one step of exact and of fd where fd is accurate, and keep "
                        "fd where faster; the choice then depends on the machine's load, so a seed's run may not "
                        "repeat (default: off: exact wherever double backward works)")
    g.add_argument("--curvature-fraction", type=float, default=D.curvature_fraction,
                   help="exact and fd: H_i v from this random fraction of task i, in (0, 1]; set 0.25 where a pass "
                        "costs in proportion to its batch (GPUs, 96 px and up on a CPU): exact then costs about "
                        "1.5x a standard step; keep 1 on small images (docs/performance.md) (default: %(default)s)")
    g.add_argument("--bn-update", default=D.bn_update, choices=["both", "first"],
                   help="BatchNorm running statistics from both passes, or from task i's pass only "
                        "(default: %(default)s)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(usage="python recipes/train.py [-c FILE] [options]", description=__doc__,
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("-c", "--config", default=None, metavar="FILE", help="YAML file of options (a run's args.yaml); "
                                                                        "the command line overrides it")
    p.add_argument("data", nargs="?", default=None, metavar="DIR", help="timm's deprecated positional --data-dir")
    _mltp_options(p)
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=None, help="hub id (or timm's hfds/ID) or local path `datasets` can load "
                                                   "(default: the shipped Fashion-MNIST subset)")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="local dataset folder, when --dataset is not given")
    g.add_argument("--train-split", default=None)
    g.add_argument("--val-split", "--eval-split", dest="eval_split", default=None,
                   help="default: validation, test or val, whichever exists")
    g.add_argument("--input-key", "--image-column", dest="image_column", default=None)
    g.add_argument("--target-key", "--label-column", dest="label_column", default=None)
    g.add_argument("--max-train-samples", type=int, default=None, metavar="N",
                   help="train on N samples of the training split: quick trials (default: all)")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="streamed data (hfids/, wds/): samples in one epoch, all processes together (default: the "
                        "size the dataset states)")
    g.add_argument("--shuffle-buffer", type=int, default=D.shuffle_buffer,
                   help="streamed data: samples in the training shuffle buffer; 0: the stream's order "
                        "(default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=D.model,
                   help="timm model name (default: %(default)s, for small images; timm: resnet50)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    g.add_argument("--pretrained-path", default=None, help="local weights file, loaded as timm loads pretrained "
                                                           "weights (size-dependent tensors resampled, another "
                                                           "classifier size re-initialised)")
    g.add_argument("--initial-checkpoint", default=None, help="weights loaded strictly after initialisation")
    g.add_argument("--resume", default=None, help="checkpoint to resume from, exactly")
    g.add_argument("--no-resume-opt", action="store_true", help="resume the model but not the optimizer state")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    g.add_argument("--gp", default=None, help="global pool type")
    g.add_argument("--img-size", type=int, default=None, help="default: the model's (32 on the shipped data); "
                                                              "models that take an image size are built for it")
    g.add_argument("--in-chans", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N", help="C H W")
    g.add_argument("--crop-pct", type=float, default=None, help="eval centre crop (default: the model's; 1.0 on "
                                                                "the shipped data)")
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    g.add_argument("-b", "--batch-size", type=int, default=D.batch_size,
                   help="size of ONE task: a step takes 2 x this per process (default: %(default)s; timm: 128)")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, help="default: 4 x batch size")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--grad-accum-steps", type=int, default=D.grad_accum_steps,
                   help="one optimizer step takes the mean of this many pair gradients")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="variant none only: with MLTP the recomputed passes would see w, not w' (default: off)")
    g.add_argument("--fast-norm", action="store_true")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="K=V")
    g.add_argument("--head-init-scale", type=float, default=None)
    g.add_argument("--head-init-bias", type=float, default=None)
    g.add_argument("--torchcompile", nargs="?", default=None, const="inductor", metavar="BACKEND",
                   help="torch.compile the model (default backend inductor); --second-order auto then uses fd")
    g.add_argument("--torchcompile-mode", default=None)
    g = p.add_argument_group("device")
    g.add_argument("--amp", action="store_true", help="mixed precision with --amp-dtype (= --mixed-precision)")
    g.add_argument("--amp-dtype", default="float16", choices=sorted(AMP_DTYPES))
    g.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default: accelerate's config")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    g.add_argument("--no-ddp-bb", action="store_true", help="keep each process's own BatchNorm buffers")
    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default=D.opt, help="timm optimizer name (default: %(default)s)")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=D.momentum)
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help="(default: %(default)s; timm: 2e-5)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM")
    g.add_argument("--clip-mode", default=D.clip_mode, help="norm, value or agc")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay; the inner step follows each layer's lr")
    g.add_argument("--layer-decay-min-scale", type=float, default=None)
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None)
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="K=V")
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default=D.sched, help="timm scheduler name (default: %(default)s)")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=D.sched_on_updates,
                   help="step the schedule every update; --no-sched-on-updates steps it per epoch, as timm does "
                        "(default: on)")
    g.add_argument("--lr", type=float, default=D.lr,
                   help="learning rate; timm's --lr-base scaling is refused, so give it for your batch "
                        "(default: %(default)s)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=D.lr_noise_pct)
    g.add_argument("--lr-noise-std", type=float, default=D.lr_noise_std)
    g.add_argument("--lr-cycle-mul", type=float, default=D.lr_cycle_mul)
    g.add_argument("--lr-cycle-decay", type=float, default=D.lr_cycle_decay)
    g.add_argument("--lr-cycle-limit", type=int, default=D.lr_cycle_limit)
    g.add_argument("--lr-k-decay", type=float, default=D.lr_k_decay)
    g.add_argument("--warmup-lr", type=float, default=D.warmup_lr)
    g.add_argument("--min-lr", type=float, default=D.min_lr)
    g.add_argument("--epochs", type=int, default=D.epochs, help="(default: %(default)s, a short run; timm: 300)")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=list(D.decay_milestones))
    g.add_argument("--decay-epochs", type=float, default=D.decay_epochs)
    g.add_argument("--warmup-epochs", type=int, default=D.warmup_epochs, help="(default: %(default)s; timm: 5)")
    g.add_argument("--warmup-prefix", action="store_true")
    g.add_argument("--cooldown-epochs", type=int, default=D.cooldown_epochs)
    g.add_argument("--patience-epochs", type=int, default=D.patience_epochs)
    g.add_argument("--decay-rate", "--dr", type=float, default=D.decay_rate)
    g = p.add_argument_group("augmentation and regularisation (mixup and cutmix mix within each task)")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--train-crop-mode", default=None)
    g.add_argument("--scale", type=float, nargs="+", default=list(D.scale),
                   help="random-resized-crop scale range (default: %(default)s; timm: 0.08 1.0)")
    g.add_argument("--ratio", type=float, nargs="+", default=list(D.ratio))
    g.add_argument("--hflip", type=float, default=D.hflip)
    g.add_argument("--vflip", type=float, default=D.vflip)
    g.add_argument("--color-jitter", type=float, default=D.color_jitter, help="(default: %(default)s; timm: 0.4)")
    g.add_argument("--color-jitter-prob", type=float, default=None)
    g.add_argument("--grayscale-prob", type=float, default=None)
    g.add_argument("--gaussian-blur-prob", type=float, default=None)
    g.add_argument("--aa", default=None, help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--bce-loss", action="store_true")
    g.add_argument("--bce-sum", action="store_true")
    g.add_argument("--bce-target-thresh", type=float, default=None)
    g.add_argument("--bce-pos-weight", type=float, default=None)
    g.add_argument("--reprob", type=float, default=D.reprob, help="random erase probability")
    g.add_argument("--remode", default=D.remode)
    g.add_argument("--recount", type=int, default=D.recount)
    g.add_argument("--mixup", type=float, default=D.mixup)
    g.add_argument("--cutmix", type=float, default=D.cutmix)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=D.mixup_prob)
    g.add_argument("--mixup-switch-prob", type=float, default=D.mixup_switch_prob)
    g.add_argument("--mixup-mode", default=D.mixup_mode)
    g.add_argument("--mixup-off-epoch", type=int, default=D.mixup_off_epoch)
    g.add_argument("--smoothing", type=float, default=D.smoothing,
                   help="label smoothing (default: %(default)s; timm: 0.1)")
    g.add_argument("--train-interpolation", default=None, help="default: the model's (timm: random)")
    g.add_argument("--drop", dest="drop_rate", type=float, default=D.drop_rate, help="dropout rate")
    g.add_argument("--drop-path", dest="drop_path_rate", type=float, default=None)
    g.add_argument("--drop-block", dest="drop_block_rate", type=float, default=None)
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)
    g = p.add_argument_group("weight EMA (of the outer weights, after each optimizer step)")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU, not evaluated")
    g.add_argument("--model-ema-decay", type=float, default=D.model_ema_decay)
    g.add_argument("--model-ema-warmup", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms; cuDNN benchmarking off): "
                        "the same run to the bit on GPUs too, at some speed; an op without a deterministic "
                        "kernel then stops the run with an error (default: off)")
    g.add_argument("-j", "--workers", type=int, default=None, help="loader processes (default: 4 with a GPU, 0 on "
                                                                   "the CPU, where the math uses every core)")
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--log-interval", type=int, default=D.log_interval, help="optimizer steps between log lines")
    g.add_argument("--log-with", nargs="+", default=None, metavar="TRACKER",
                   help="Accelerate trackers (tensorboard, wandb, ...: their packages are optional)")
    g.add_argument("--log-wandb", action="store_true", help="= --log-with wandb")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-tags", nargs="+", default=None)
    g.add_argument("--wandb-resume-id", default=None)
    g.add_argument("--save-images", action="store_true", help="save each logged step's pair as an image")
    g.add_argument("--output", default=D.output, help="files go to OUTPUT/EXPERIMENT")
    g.add_argument("--experiment", default=None)
    g.add_argument("--eval-metric", default=D.eval_metric, help="top1, top5 or loss: ranks checkpoints")
    g.add_argument("--val-interval", type=int, default=D.val_interval, help="epochs between evaluations")
    g.add_argument("--checkpoint-hist", type=int, default=D.checkpoint_hist,
                   help="keep the N best epochs as checkpoint-EPOCH.pth.tar (default: %(default)s)")
    g.add_argument("--checkpoint-interval", type=int, default=D.checkpoint_interval,
                   help="also write last.pth.tar every N optimizer steps")
    g.add_argument("--recovery-interval", type=int, default=D.recovery_interval,
                   help="also write recovery-EPOCH-STEP.pth.tar every N optimizer steps")
    g.add_argument("--max-bad-steps", type=int, default=D.max_bad_steps,
                   help="stop after this many non-finite losses in a row (default: %(default)s)")
    g.add_argument("--max-bad-samples", type=int, default=D.max_bad_samples,
                   help="unreadable samples are skipped; stop after this many in a row (default: %(default)s)")
    g.add_argument("--max-bad-share", type=float, default=D.max_bad_share,
                   help="stop when more than this share of a split is unreadable in an epoch (default: %(default)s)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load --resume/--initial-checkpoint/--pretrained-path files that need pickle, which can run "
                        "code from the file (default: tensors and plain types only)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar (shown only on a "
                                                                                "terminal anyway)")
    for flag in NO_EFFECT:
        if flag == "--local_rank":
            p.add_argument(flag, "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag in REFUSED:
        extra = ["--train-steps-per-epoch"] if flag == "--train-batches-per-epoch" else []
        p.add_argument(flag, *extra, action=Refused)
    _fill_help(p)
    return p


def read_config(path: str, parser: ArgumentParser) -> dict:
    """A YAML file of options (this recipe's args.yaml, or timm's) as parser defaults."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MLTPConfigError(f"-c {path!r}: cannot read it as YAML ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise MLTPConfigError(f"-c {path!r} holds a {type(config).__name__}; expected a mapping of option: value")
    known = set(vars(parser.parse_args([])))   # every option's name, with its default
    refused = {_dest(flag): default_why for flag, default_why in REFUSED.items()}
    no_effect = {_dest(flag) for flag in NO_EFFECT}
    defaults = {}
    for key, value in config.items():
        key = ALIASES.get(key, key)
        if key in refused:
            default, why = refused[key]
            if value != default:
                raise MLTPConfigError(f"-c {path!r}: {key}: {value!r} (a timm train.py option) is not supported by "
                                      f"this recipe: {why}")
        elif key in no_effect:
            continue
        elif key in known:
            defaults[key] = value
        else:
            raise MLTPConfigError(f"-c {path!r}: {key!r} is not an option of this recipe; remove it "
                                  f"(python recipes/train.py --help lists the options)")
    return defaults


def to_train_args(ns: argparse.Namespace) -> TrainArgs:
    """The parsed options as TrainArgs: timm's spellings resolved, lists as tuples, timm's '' as None."""
    values = {k: v for k, v in vars(ns).items() if k not in {_dest(f) for f in NO_EFFECT} | {"config"}}
    data, amp, amp_dtype, log_wandb = (values.pop(k) for k in ("data", "amp", "amp_dtype", "log_wandb"))
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
        elif value == "":          # timm's "not given"
            values[key] = getattr(D, key)
    values["data_dir"] = values["data_dir"] or data
    if amp:
        if amp_dtype not in AMP_DTYPES:
            raise MLTPConfigError(f"--amp-dtype {amp_dtype!r} is not one of {', '.join(AMP_DTYPES)}")
        if values["mixed_precision"] not in (None, AMP_DTYPES[amp_dtype]):
            raise MLTPConfigError(f"--amp --amp-dtype {amp_dtype} contradicts --mixed-precision "
                                  f"{values['mixed_precision']}; give one of them")
        values["mixed_precision"] = AMP_DTYPES[amp_dtype]
    if log_wandb:
        values["log_with"] = tuple(dict.fromkeys([*(values["log_with"] or ()), "wandb"]))
    if values["lr"] is None:
        raise MLTPConfigError("lr: null: timm derives lr from --lr-base, which this recipe does not; give --lr")
    return TrainArgs(**values)


def parse_args(argv=None) -> TrainArgs:
    """timm's two-step parse: -c FILE sets the defaults, the rest of the command line overrides them."""
    parser = build_parser()
    config_parser = ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("-c", "--config", default=None)
    config, _ = config_parser.parse_known_args(argv)
    if config.config:
        parser.set_defaults(**read_config(config.config, parser))
    return to_train_args(parser.parse_args(argv))


def run(argv=None) -> int:
    """Train; the exit code. A crash (any other exception) propagates with its traceback: exit code 1."""
    try:
        train(parse_args(argv))
    except MLTPConfigError as e:  # bad input: say what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:             # the engine printed where it saved and how to resume
        return PREEMPTED_EXIT_CODE
    return 0


def main(argv=None) -> int:
    """`run`, then, whatever happened, leave the process group and record the exit code (timm_mltp/launch.py)."""
    code = 1
    try:
        code = run(argv)
    finally:
        end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
