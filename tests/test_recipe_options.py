"""recipes/train.py's timm options: each group changes what it should, with MLTP's semantics kept (mixup
within each task, EMA of the outer weights, k-step accumulation = the mean of k pair gradients), `-c
args.yaml` round trips, pretrained files load through timm's loading, refused options fail in one line."""
import copy
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy

from timm_mltp import alpha_from_optimizer, mltp_backward, split_tasks
from timm_mltp.build import build_model, build_optimizer, build_scheduler, build_transforms, mltp_config
from timm_mltp.data import DEFAULT_DATASET, mix_within_tasks
from timm_mltp.engine import TrainArgs, Trainer, accumulation_groups
from timm_mltp.errors import MLTPConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import train as recipe  # noqa: E402

datasets.disable_progress_bars()

# every option of timm's train.py (huggingface/pytorch-image-models, train.py, timm 1.0.29): each one is
# supported, accepted without effect, or refused with a reason by recipes/train.py
TIMM_OPTIONS = """
--data-dir --dataset --train-split --val-split --train-num-samples --val-num-samples --dataset-download
--class-map --input-img-mode --input-key --target-key --dataset-trust-remote-code --model --pretrained
--pretrained-path --initial-checkpoint --resume --no-resume-opt --num-classes --gp --img-size --in-chans
--input-size --crop-pct --mean --std --interpolation --batch-size --validation-batch-size --channels-last
--fuser --grad-accum-steps --grad-checkpointing --fast-norm --model-kwargs --head-init-scale --head-init-bias
--torchcompile-mode --torchscript --torchcompile --device --amp --amp-dtype --model-dtype --no-ddp-bb
--synchronize-step --local_rank --device-modules --opt --opt-eps --opt-betas --momentum --weight-decay
--clip-grad --clip-mode --layer-decay --layer-decay-min-scale --layer-decay-no-opt-scale --opt-kwargs --sched
--sched-on-updates --lr --lr-base --lr-base-size --lr-base-scale --lr-noise --lr-noise-pct --lr-noise-std
--lr-cycle-mul --lr-cycle-decay --lr-cycle-limit --lr-k-decay --warmup-lr --min-lr --epochs --epoch-repeats
--start-epoch --decay-milestones --decay-epochs --warmup-epochs --warmup-prefix --cooldown-epochs
--patience-epochs --decay-rate --no-aug --train-crop-mode --scale --ratio --hflip --vflip --color-jitter
--color-jitter-prob --grayscale-prob --gaussian-blur-prob --aa --aug-repeats --aug-splits --jsd-loss --bce-loss
--bce-sum --bce-target-thresh --bce-pos-weight --reprob --remode --recount --resplit --mixup --cutmix
--cutmix-minmax --mixup-prob --mixup-switch-prob --mixup-mode --mixup-off-epoch --smoothing
--train-interpolation --drop --drop-connect --drop-path --drop-block --bn-momentum --bn-eps --sync-bn --dist-bn
--split-bn --model-ema --model-ema-force-cpu --model-ema-decay --model-ema-warmup --seed --worker-seeding
--log-interval --val-interval --recovery-interval --checkpoint-hist --workers --save-images --pin-mem
--no-prefetcher --output --experiment --eval-metric --tta --use-multi-epochs-loader --log-wandb --wandb-project
--wandb-tags --wandb-resume-id --train-img-sizes --train-batch-sizes --train-size-probs --train-size-schedule
--train-size-schedule-spread --train-size-random-mix --train-batches-per-epoch --variable-batch-loss-scale
--naflex-loader --naflex-train-seq-lens --naflex-max-seq-len --naflex-patch-sizes --naflex-patch-size-probs
--naflex-loss-scale --naflex-patchify-channels-first --kd-model-name --kd-distill-type --kd-loss-type
--distill-loss-weight --task-loss-weight --kd-temperature --kd-student-feature-dim --kd-teacher-feature-dim
--kd-token-distill-type
""".split()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """64 training and 32 test images of the shipped Fashion-MNIST subset, as a parquet folder."""
    folder = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 64), ("test", 32)):
        ds = datasets.load_dataset("parquet", data_files=str(DEFAULT_DATASET / f"{split}.parquet"), split="train")
        ds.select(range(n)).to_parquet(str(folder / f"{split}.parquet"))
    return str(folder)


def quick_args(tmp_path, data, **kwargs) -> TrainArgs:
    return TrainArgs(**{**dict(model="test_resnet", dataset=data, img_size=32, epochs=1, batch_size=8, workers=0,
                               output=str(tmp_path), experiment="run", progress=False), **kwargs})


# ---- augmentation and preprocessing ----------------------------------------------------------------

def test_augmentation_and_eval_options_reach_timms_transforms():
    model = timm.create_model("test_resnet", num_classes=10)
    plain_train, plain_eval = build_transforms(TrainArgs(model="test_resnet"), model)
    args = TrainArgs(model="test_resnet", aa="rand-m9-mstd0.5", reprob=0.5, remode="pixel", recount=2,
                     color_jitter=0.4, vflip=0.5, ratio=(0.5, 2.0), train_interpolation="bicubic", crop_pct=0.5,
                     mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="nearest")
    train_tf, eval_tf = build_transforms(args, model)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "RandAugment" not in [type(t).__name__ for t in plain_train.transforms]
    assert {"RandAugment", "RandomVerticalFlip", "RandomErasing"} <= set(names)
    crop, erase = train_tf.transforms[0], train_tf.transforms[-1]
    assert crop.ratio == (0.5, 2.0) and crop.interpolation.value == "bicubic"
    assert (erase.probability, erase.mode, erase.max_count) == (0.5, "pixel", 2)
    no_aa, _ = build_transforms(replace(args, aa=None), model)    # timm: AutoAugment replaces the jitter
    jitter = next(t for t in no_aa.transforms if type(t).__name__ == "ColorJitter")
    assert jitter.brightness == (0.6, 1.4)
    # eval: resize to 32 / crop_pct, centre crop 32, the given interpolation and normalisation
    resize, center, _, norm = eval_tf.transforms
    assert (resize.size, resize.interpolation.value, center.size) == (64, "nearest", (32, 32))
    assert torch.allclose(norm.mean, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(norm.std, torch.tensor([0.4, 0.5, 0.6]))
    assert plain_eval.transforms[0].size == 32          # the shipped data: crop_pct 1.0


# ---- optimizer, layer decay and the inner step -----------------------------------------------------

def test_layer_decay_gives_each_layer_its_learning_rate_and_inner_step():
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    args = TrainArgs(model="test_vit", opt="adamw", lr=0.01, layer_decay=0.5, opt_betas=(0.8, 0.95), opt_eps=1e-6,
                     opt_kwargs={"amsgrad": True})
    optimizer = build_optimizer(args, model)
    build_scheduler(args, optimizer, updates_per_epoch=10)
    lrs = sorted({round(g["lr"], 9) for g in optimizer.param_groups})
    assert len(lrs) >= 4 and lrs[-1] == pytest.approx(0.01) and lrs[0] < 0.01 / 4
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["amsgrad"] for g in optimizer.param_groups)
    plain = build_optimizer(replace(args, layer_decay=None), model)
    assert len(plain.param_groups) == 2                 # decay / no decay only
    # alpha follows each parameter's group lr: the head takes the full step, the first block a smaller one
    alpha = alpha_from_optimizer(model, optimizer)
    assert alpha["head.weight"] == pytest.approx(0.01)
    assert alpha["blocks.0.attn.qkv.weight"] < alpha["head.weight"] / 2
    assert alpha["patch_embed.proj.weight"] < alpha["blocks.0.attn.qkv.weight"]


def test_schedule_options_reach_create_scheduler():
    model = torch.nn.Linear(4, 2)
    args = TrainArgs(lr=0.1, epochs=3, warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4, cooldown_epochs=2)
    optimizer = build_optimizer(args, model)
    scheduler, num_epochs = build_scheduler(args, optimizer, updates_per_epoch=10)
    assert num_epochs == 5                                      # epochs + cooldown, as timm counts them
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)    # warmup starts at --warmup-lr
    scheduler.step_update(num_updates=30)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)    # the cosine ends at --min-lr
    args = TrainArgs(lr=0.1, sched="step", decay_epochs=1, decay_rate=0.5, sched_on_updates=False)
    optimizer = build_optimizer(args, model)
    scheduler, _ = build_scheduler(args, optimizer, updates_per_epoch=10)
    scheduler.step(2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


# ---- mixup and cutmix within each task -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_stay_inside_each_task(mode):
    b = 4   # task size: task i has positive images and classes 0-1, task j negative images and classes 2-3
    images = torch.cat([torch.arange(1, b + 1.0), -torch.arange(1, b + 1.0)]).view(-1, 1, 1, 1).expand(-1, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3])
    mixup = Mixup(mixup_alpha=1.0 if mode == "mixup" else 0.0, cutmix_alpha=1.0 if mode == "cutmix" else 0.0,
                  label_smoothing=0.0, num_classes=4)
    torch.manual_seed(0)
    mixed, targets = mix_within_tasks(mixup, images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (2 * b, 4)
    assert (mixed[:b] > 0).all() and (mixed[b:] < 0).all()        # no pixel crosses between the tasks
    assert targets[:b, 2:].sum() == 0 and targets[b:, :2].sum() == 0
    assert not torch.equal(mixed, images)                          # and it did mix, within each task


def test_the_engine_mixes_within_tasks_and_trains_on_soft_targets(tmp_path, tiny_data):
    trainer = Trainer(quick_args(tmp_path, tiny_data, mixup=0.8, cutmix=1.0, smoothing=0.1))
    assert isinstance(trainer.train_loss, SoftTargetCrossEntropy)
    batch = next(iter(trainer.train_loader))
    images, targets = trainer.prepare_batch(batch)
    task_i, task_j = split_tasks((images, targets))
    for (_, y), labels in zip((task_i, task_j), batch["labels"].view(2, -1)):
        others = [c for c in range(10) if c not in labels.tolist()]
        # a class of neither mixed sample keeps the smoothing floor 0.1 / 10, so no label of the other task
        # leaked in; the task's own classes hold the rest
        torch.testing.assert_close(y[:, others], torch.full_like(y[:, others], 0.01))
        torch.testing.assert_close(y.sum(1), torch.ones(len(y)))
    trainer.model.train()
    assert trainer.train_step(batch)["loss"] > 0


# ---- gradient accumulation -------------------------------------------------------------------------

def test_accumulated_step_is_the_mean_of_single_pair_gradients(tmp_path, tiny_data):
    k = 3
    assert [len(g) for g in accumulation_groups(range(7), k)] == [3, 3, 1]   # timm: a shorter last group
    # a smooth model: on ReLU/max-pool nets the exact gradient jumps where rounding (the 1/k loss scale) moves a
    # value across a kink (seen: 0.3 % on one pair of test_resnet on an AMD CPU)
    trainer = Trainer(quick_args(tmp_path, tiny_data, model="test_efficientnet", grad_accum_steps=k, alpha=0.05,
                                 second_order="exact"))
    assert trainer.updates_per_epoch == 2                                     # 4 loader batches, 3 per step
    batches = [b for _, b in zip(range(k), trainer.train_loader)]
    trainer.model.train()
    reference = copy.deepcopy(trainer.module)
    seen = {}
    trainer.optimizer.optimizer.step = lambda *a, **kw: seen.update(
        {n: p.grad.clone() for n, p in trainer.module.named_parameters()})
    trainer.train_step(*batches)
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for batch in batches:                     # each pair's MLTP gradient alone, at the same weights
        reference.zero_grad(set_to_none=True)
        task_i, task_j = split_tasks((batch["pixel_values"], batch["labels"]))
        mltp_backward(reference, task_i, task_j, lambda m, b: F.cross_entropy(m(b[0]), b[1]), trainer.mltp,
                      alpha=0.05)
        for n, p in reference.named_parameters():
            expected[n] += p.grad / k
    assert seen.keys() == expected.keys()
    # the same sums in another order: float32 rounding, ~1e-5 of the gradient's norm (per tensor against the
    # whole norm: a tensor whose own gradient is ~1e-6 holds nothing but rounding)
    total = torch.stack([e.norm() for e in expected.values()]).norm()
    for n, g in seen.items():
        assert (g - expected[n]).norm() <= 1e-4 * total, n


# ---- EMA and checkpoints ---------------------------------------------------------------------------

def test_ema_follows_the_outer_weights_and_is_saved_as_timm_saves_it(tmp_path, tiny_data):
    trainer = Trainer(quick_args(tmp_path, tiny_data, model_ema=True, model_ema_decay=0.9))
    loader = iter(trainer.train_loader)
    floats = lambda sd: {k: v.clone() for k, v in sd.items() if v.is_floating_point()}  # noqa: E731
    trainer.train_step(next(loader))
    after_1 = floats(trainer.module.state_dict())
    assert all(torch.equal(v, after_1[k]) for k, v in floats(trainer.ema.module.state_dict()).items())  # timm:
    trainer.train_step(next(loader))                                    # the first update copies the weights
    after_2 = floats(trainer.module.state_dict())
    ema = floats(trainer.ema.module.state_dict())
    for key, value in ema.items():            # decay 0.9 between the outer weights after step 1 and step 2
        torch.testing.assert_close(value, 0.9 * after_1[key] + 0.1 * after_2[key], msg=key)
    assert any(not torch.equal(ema[k], after_2[k]) for k in ema)
    trainer.out_dir.mkdir(parents=True)
    trainer.save("last")
    saved = torch.load(trainer.out_dir / "last.pth.tar", weights_only=True)
    assert all(torch.equal(saved["state_dict_ema"][k], v) for k, v in ema.items())
    loaded = timm.models.load_state_dict(str(trainer.out_dir / "last.pth.tar"))   # timm prefers the EMA
    assert all(torch.equal(loaded[k], v) for k, v in ema.items())


def test_checkpoint_history_recovery_files_and_eval_metric(tmp_path, tiny_data):
    args = quick_args(tmp_path, tiny_data, epochs=3, checkpoint_hist=2, recovery_interval=2, eval_metric="loss",
                      model_ema=True, model_ema_decay=0.5)
    result = Trainer(args).fit()
    files = {p.name for p in (tmp_path / "run").iterdir()}
    kept = {f for f in files if f.startswith("checkpoint-")}
    losses = [r["eval_loss"] for r in result["rows"]]                  # EMA's, as timm ranks with an EMA
    best_two = sorted(range(3), key=losses.__getitem__)[:2]
    assert kept == {f"checkpoint-{e}.pth.tar" for e in best_two}
    assert result["best_epoch"] == best_two[0] and result["best_metric"] == min(losses)
    assert [f for f in files if f.startswith("recovery-")] == ["recovery-2-3.pth.tar"]   # the latest only
    assert {"last.pth.tar", "model_best.pth.tar", "args.yaml", "summary.csv"} <= files


def test_resume_with_accumulation_mixup_and_ema_is_exact(tmp_path, tiny_data):
    args = quick_args(tmp_path, tiny_data, epochs=2, grad_accum_steps=2, mixup=0.5, cutmix=0.5, model_ema=True,
                      model_ema_decay=0.5, drop_rate=0.2, checkpoint_interval=1)
    whole = Trainer(replace(args, experiment="whole"))
    whole.fit()

    class Killed(Exception):
        pass

    cut = Trainer(replace(args, experiment="cut"))
    save = cut.save

    def save_then_die(kind, **where):
        save(kind, **where)
        if kind == "last" and cut.num_updates == 3:     # mid-epoch 1 (2 optimizer steps per epoch)
            raise Killed

    cut.save = save_then_die
    with pytest.raises(Killed):
        cut.fit()
    resumed = Trainer(replace(args, experiment="cut", resume=str(tmp_path / "cut" / "last.pth.tar")))
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 2)
    resumed.fit()
    for ours, theirs in ((resumed.module, whole.module), (resumed.ema.module, whole.ema.module)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    assert resumed.rows == whole.rows


# ---- -c / --config ---------------------------------------------------------------------------------

def test_args_yaml_round_trips_through_config(tmp_path, tiny_data, capsys):
    argv = ["--model", "test_resnet", "--dataset", tiny_data, "--img-size", "32", "--epochs", "1", "-b", "8",
            "-j", "0", "--output", str(tmp_path), "--experiment", "yaml", "--no-progress", "--opt", "adamw",
            "--lr", "0.002", "--opt-betas", "0.8", "0.9", "--mixup", "0.2", "--smoothing", "0.1", "--model-ema",
            "--model-kwargs", "zero_init_last=False", "--scale", "0.5", "1.0", "--val-split", "test"]
    assert recipe.main(argv) == 0
    written = tmp_path / "yaml" / "args.yaml"
    assert recipe.parse_args(["-c", str(written)]) == recipe.parse_args(argv)
    again = recipe.parse_args(["-c", str(written), "--epochs", "5"])     # the command line overrides the file
    assert again.epochs == 5 and again.opt_betas == (0.8, 0.9) and again.model_kwargs == {"zero_init_last": False}


def test_config_accepts_timms_keys_at_timms_defaults(tmp_path):
    timm_yaml = tmp_path / "timm.yaml"
    timm_yaml.write_text("model: test_resnet\ndrop: 0.1\nval_split: test\naug_splits: 0\ndist_bn: reduce\n"
                         "no_prefetcher: false\noutput: ''\n")
    args = recipe.parse_args(["-c", str(timm_yaml)])
    assert (args.model, args.drop_rate, args.eval_split, args.output) == ("test_resnet", 0.1, "test", "output/train")
    timm_yaml.write_text("aug_splits: 3\n")
    with pytest.raises(MLTPConfigError, match="aug_splits: 3 .* is not supported by this recipe"):
        recipe.parse_args(["-c", str(timm_yaml)])
    timm_yaml.write_text("learning_rate: 0.1\n")
    with pytest.raises(MLTPConfigError, match="'learning_rate' is not an option"):
        recipe.parse_args(["-c", str(timm_yaml)])


# ---- model building --------------------------------------------------------------------------------

def test_vit_weights_at_224_load_at_32_with_timms_resampling(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_vit", img_size=224, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "vit224.pth")
    args = TrainArgs(model="test_vit", img_size=32, pretrained_path=str(tmp_path / "vit224.pth"))
    model, note = build_model(args, num_classes=10)
    assert model.patch_embed.img_size == (32, 32)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(2, 2), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (10, 64)
    assert "re-initialised head.weight, head.bias (5 -> 10 classes)" in note and "pos_embed (1, 197, 64)" in note
    same_head, note = build_model(args, num_classes=5)
    assert torch.equal(same_head.head.weight, source.head.weight) and "re-initialised" not in note


def test_model_options_reach_create_model():
    args = TrainArgs(model="test_vit", img_size=48, in_chans=1, drop_path_rate=0.1, gp="avg",
                     model_kwargs={"qkv_bias": False}, head_init_scale=0.0, grad_checkpointing=True,
                     channels_last=True)
    model, _ = build_model(args, num_classes=3)
    assert model.patch_embed.img_size == (48, 48) and model.patch_embed.proj.in_channels == 1
    assert model.blocks[0].attn.qkv.bias is None and model.global_pool == "avg" and model.grad_checkpointing
    assert model.head.weight.abs().sum() == 0
    with pytest.raises(MLTPConfigError, match="cannot be built with these options"):
        build_model(TrainArgs(model="test_resnet", model_kwargs={"no_such_kwarg": 1}), num_classes=3)


def test_compiled_models_take_fd_and_checkpointing_is_refused():
    assert mltp_config(TrainArgs(torchcompile="inductor")).second_order == "fd"
    # recomputed forward passes would see w, not w' (measured: fo and exact 10-12 % off on test_resnet)
    with pytest.raises(MLTPConfigError, match="--grad-checkpointing cannot be combined with MLTP"):
        mltp_config(TrainArgs(grad_checkpointing=True))
    assert mltp_config(TrainArgs(grad_checkpointing=True, variant="none")).variant == "none"
    with pytest.raises(MLTPConfigError, match="exact needs double backward"):
        mltp_config(TrainArgs(torchcompile="inductor", second_order="exact"))


# ---- options this recipe does not take --------------------------------------------------------------

def test_every_timm_option_is_known():
    parser = recipe.build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert [option for option in TIMM_OPTIONS if option not in flags] == []
    options_doc = (ROOT / "docs" / "recipe.md").read_text()   # the option table says why each one is refused
    assert [flag for flag in recipe.REFUSED if f"`{flag}`" not in options_doc] == []


@pytest.mark.parametrize("argv,message", [
    (["--aug-splits", "2"], "error: --aug-splits (a timm train.py option) is not supported by this recipe: "),
    (["--torchscript"], "error: --torchscript (a timm train.py option) is not supported by this recipe: "),
    (["--naflex-loader"], "NaFlex"),
    (["--no-such-option"], "error: unrecognized arguments: --no-such-option"),
    (["--eval-metric", "top3"], "error: --eval-metric 'top3' is not one of top1, top5, loss"),
    (["--mixup", "0.2", "-b", "7"], "the task size must be even"),
    (["--dataset", "torch/cifar10"], "timm's torch/ datasets are read by timm's own loaders"),
    (["--log-with", "no_such_tracker"], "is not an Accelerate tracker"),
])
def test_unsupported_options_fail_in_one_line(tmp_path, capsys, argv, message):
    assert recipe.main(argv + ["--output", str(tmp_path), "--model", "test_resnet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "usage:" not in err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_missing_tracker_package_is_named(tmp_path, capsys):
    assert recipe.main(["--log-with", "tensorboard", "--output", str(tmp_path)]) == 2
    assert "--log-with tensorboard: the tensorboard package is not installed; pip install tensorboard" in \
        capsys.readouterr().err


def test_no_effect_options_are_accepted():
    args = recipe.parse_args(["--no-prefetcher", "--dataset-download", "--local_rank", "0", "--synchronize-step",
                              "--amp", "--amp-dtype", "bfloat16", "--log-wandb"])
    assert args.mixed_precision == "bf16" and args.log_with == ("wandb",)
    with pytest.raises(MLTPConfigError, match="--amp --amp-dtype float16 contradicts --mixed-precision bf16"):
        recipe.parse_args(["--amp", "--mixed-precision", "bf16"])
