"""MLTPTrainer: trains transformers and timm models, and its step gradient is the core's (SPEC.md)."""
import contextlib
import copy
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          HfArgumentParser, TimmWrapperConfig, TimmWrapperForImageClassification, TrainerCallback,
                          TrainingArguments, default_data_collator)

from timm_mltp import (MLTPConfig, MLTPConfigError, MLTPTrainer, MLTPTrainingArguments, mltp_backward,
                       select_parameters, split_tasks)
from timm_mltp.data import apply_transforms, collate_image_batch, create_transforms, load_image_dataset

LOGGED = ("mltp_loss_i", "mltp_loss_j", "mltp_grad_cosine", "mltp_alpha")


# ---- models, data, arguments

def tiny_bert(dropout=0.0):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=4, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                                    num_labels=4, pad_token_id=0))


def token_data(n, seed=0):
    """4 classes: about half the tokens of a sequence come from its class's own 4-token range."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    noise = torch.randint(0, 32, (n, 8), generator=g)
    signal = 32 + 4 * labels[:, None] + torch.randint(0, 4, (n, 8), generator=g)
    ids = torch.where(torch.rand(n, 8, generator=g) < 0.5, signal, noise)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "label": labels.tolist()})


def fashion_mnist(model, n_train=800, n_eval=400):
    """The shipped subset at 28x28, grayscale, the way HF's image example feeds it: with_transform + collator."""
    ds = load_image_dataset()
    train_tf = create_transforms(model, img_size=28, scale=(0.8, 1.0), hflip=0.0, color_jitter=0.0, in_chans=1)
    eval_tf = create_transforms(model, img_size=28, is_training=False, crop_pct=1.0, in_chans=1)
    train = ds.train.shuffle(seed=0).select(range(n_train))
    return (apply_transforms(train, train_tf, ds.image_column, ds.label_column, in_chans=1),
            apply_transforms(ds.eval.select(range(n_eval)), eval_tf, ds.image_column, ds.label_column, in_chans=1))


def mltp_args(output_dir, **kwargs):
    defaults = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                    seed=0, per_device_eval_batch_size=100)
    return MLTPTrainingArguments(**{**defaults, **kwargs})


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def train_and_evaluate(model, args, train, test, **kwargs):
    trainer = MLTPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                          **kwargs)
    trainer.train()
    return trainer, trainer.evaluate()


def training_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


def assert_mltp_logged(trainer):
    logs = training_logs(trainer)
    assert logs and all(key in log and np.isfinite(log[key]) for log in logs for key in LOGGED)


# ---- each kind of model trains and evaluates

@pytest.mark.parametrize("make_model", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_transformers_model_trains_and_logs_mltp_stats(make_model, tmp_path):
    model = make_model()
    if make_model is tiny_gpt2:  # transformers' Conv1D counts as fully connected
        assert any(name.endswith("attn.c_attn.weight") for name in select_parameters(model, "fc"))
    args = mltp_args(tmp_path, per_device_train_batch_size=16, learning_rate=3e-3, num_train_epochs=3,
                     logging_steps=1, mltp_variant="fc", mltp_alpha_rule="lr", mltp_alpha_scale=10.0)
    trainer, metrics = train_and_evaluate(model, args, token_data(512), token_data(256, seed=1))
    assert metrics["eval_accuracy"] > 0.6  # chance: 0.25
    assert_mltp_logged(trainer)
    # 512 samples in loader batches of 2B = 32: 16 steps per epoch
    assert trainer.state.global_step == 3 * 512 // 32
    for log in training_logs(trainer):  # alpha follows the (decaying) learning rate
        assert log["mltp_alpha"] == pytest.approx(10.0 * log["learning_rate"])


def test_timm_wrapper_trains_on_fashion_mnist(tmp_path):
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10,
                                                                model_args={"in_chans": 1}))
    train, test = fashion_mnist(model.timm_model)
    # remove_unused_columns keeps its default: MLTPTrainer leaves with_transform datasets alone
    args = mltp_args(tmp_path, per_device_train_batch_size=16, learning_rate=3e-3, num_train_epochs=2,
                     logging_steps=10, mltp_variant="conv")   # the default alpha rule
    trainer, metrics = train_and_evaluate(model, args, train, test, data_collator=collate_image_batch)
    assert metrics["eval_accuracy"] > 0.5  # chance: 0.1
    assert_mltp_logged(trainer)


def test_plain_timm_module_trains_evaluates_and_predicts(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    train, test = fashion_mnist(model)
    args = mltp_args(tmp_path, per_device_train_batch_size=16, learning_rate=3e-3, num_train_epochs=2,
                     logging_steps=10, mltp_variant="layer4.*,fc.*", mltp_alpha_rule="lr", mltp_alpha_scale=10.0)
    trainer, metrics = train_and_evaluate(model, args, train, test, data_collator=collate_image_batch)
    assert metrics["eval_accuracy"] > 0.5 and np.isfinite(metrics["eval_loss"])
    assert_mltp_logged(trainer)

    labelled = trainer.predict(test)
    assert labelled.predictions.shape == (len(test), 10) and labelled.metrics["test_accuracy"] > 0.5
    # without labels: logits only
    images = [{"pixel_values": example["pixel_values"]} for example in test.select(range(30))]
    trainer.data_collator = default_data_collator
    unlabelled = trainer.predict(images)
    assert unlabelled.label_ids is None
    np.testing.assert_allclose(unlabelled.predictions, labelled.predictions[:30], rtol=1e-4, atol=1e-5)


# ---- the gradient the optimizer sees is the core's

class _GradRecorder(TrainerCallback):
    def __init__(self, grads):
        self.grads = grads

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # after clipping
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


class RecordingTrainer(MLTPTrainer):
    """Keeps the loader batches it trains on, and the gradient the optimizer sees at each step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.grads = [], []
        self.add_callback(_GradRecorder(self.grads))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def bert_loss(module, batch):
    return module(**batch).loss


def core_step_gradient(model, batches, cfg, alpha, loss_scale=1.0, autocast=None):
    """The mean of the pairs' MLTP gradients, computed directly with the core; and each pair's stats."""
    model = copy.deepcopy(model).train()
    model.zero_grad(set_to_none=True)
    stats = []
    for batch in batches:
        with autocast or contextlib.nullcontext():
            stats.append(mltp_backward(model, *split_tasks(batch), bert_loss, cfg, alpha,
                                       loss_scale=loss_scale / len(batches)))
    return {n: p.grad for n, p in model.named_parameters()}, stats


def clipped(grads, max_norm):
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    assert norm > 2 * max_norm, "the test means to clip"
    return {n: g * (max_norm / (norm + 1e-6)) for n, g in grads.items()}


def assert_grads_close(got, expected, rtol):
    assert got.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    worst = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert worst <= rtol * scale, f"max abs error {worst:.3g} vs gradient scale {scale:.3g}"


def fake_cuda_fp16(trainer, init_scale):
    """What Accelerate sets up for fp16 on a GPU (autocast and a GradScaler), here on the CPU."""
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)


# second order pinned: `auto` measures and may keep fd where it is accurate and faster, so a separate core run
# could settle otherwise
STEP_SETTINGS = dict(max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", mltp_variant="fc",
                     mltp_second_order="exact",
                     mltp_alpha_rule="lr", mltp_alpha_scale=10.0, per_device_train_batch_size=4)


@pytest.mark.parametrize("precision, accumulation, max_grad_norm", [
    ("fp32", 3, 0.05),   # with clipping
    ("fp32", 2, 0.0),
    ("bf16", 2, 0.0),
    ("fp16", 2, 0.0),
])
def test_step_gradient_is_mean_of_pair_gradients(precision, accumulation, max_grad_norm, tmp_path):
    model = tiny_bert()
    initial = copy.deepcopy(model)
    args = mltp_args(tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm,
                     bf16=precision == "bf16", fp16=precision == "fp16", **STEP_SETTINGS)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=token_data(64))
    scale = 2.0 ** 8
    if precision == "fp16":
        fake_cuda_fp16(trainer, init_scale=scale)
    trainer.train()

    assert len(trainer.batches) == accumulation and len(trainer.grads) == 1
    assert all(len(b["input_ids"]) == 2 * 4 for b in trainer.batches)  # a loader batch is one pair of 2B
    autocast = {"bf16": torch.autocast("cpu", dtype=torch.bfloat16),
                "fp16": torch.autocast("cpu", dtype=torch.float16)}.get(precision)
    expected, _ = core_step_gradient(initial, trainer.batches, args.mltp_config, alpha=1e-2 * 10.0,
                                  loss_scale=scale if precision == "fp16" else 1.0, autocast=autocast)
    if precision == "fp16":  # the scaled backward, then unscaled as the Trainer does before it measures the norm
        expected = {n: g / scale for n, g in expected.items()}
    if max_grad_norm:
        expected = clipped(expected, max_grad_norm)
    assert_grads_close(trainer.grads[0], expected, rtol={"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}[precision])


def test_fp16_overflow_skips_the_step(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = mltp_args(tmp_path, fp16=True, logging_steps=1, **STEP_SETTINGS)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=token_data(64))
    fake_cuda_fp16(trainer, init_scale=2.0 ** 100)  # scaled fp16 gradients overflow
    trainer.train()
    # (not accelerator.optimizer_step_was_skipped: with the default fused AdamW the skip happens inside the kernel)
    assert trainer.accelerator.scaler.get_scale() < 2.0 ** 100
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # what overflowed is left out of the logs (as the Trainer does for "loss"); nothing non-finite is logged
    logs = training_logs(trainer)
    assert logs and "mltp_loss_j" not in logs[0]
    assert all(np.isfinite(log[key]) for log in logs for key in LOGGED if key in log)


# ---- resume and multi-process

def test_resume_gives_the_uninterrupted_result(tmp_path):
    # 64 samples in pairs of 2 x 8: 4 steps per epoch; 6 steps cross an epoch, the checkpoint is mid-epoch
    settings = dict(per_device_train_batch_size=8, max_steps=6, save_strategy="steps", save_steps=3,
                    learning_rate=3e-3, mltp_variant="full", mltp_alpha_rule="lr", mltp_alpha_scale=10.0, logging_steps=1,
                    mltp_second_order="exact")   # both runs take the same steps (auto measures, and could differ)
    whole = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / "whole", **settings),
                        train_dataset=token_data(64))
    whole.train()
    resumed = MLTPTrainer(model=tiny_bert(dropout=0.1), args=mltp_args(tmp_path / "resumed", **settings),
                          train_dataset=token_data(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    # the resumed state carries the first 3 steps' logs from the checkpoint
    assert [log["loss"] for log in training_logs(resumed)] == [log["loss"] for log in training_logs(whole)]


@pytest.mark.slow
def test_two_processes_average_their_local_mltp_gradients(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "trainer_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not torch.equal(ranks[0]["batches"][0]["input_ids"], ranks[1]["batches"][0]["input_ids"])  # own shards
    model = tiny_bert()
    model.load_state_dict(ranks[0]["initial"])
    from trainer_ddp_worker import DDP_SETTINGS
    cfg = mltp_args(tmp_path, **DDP_SETTINGS).mltp_config
    alpha = DDP_SETTINGS["learning_rate"] * DDP_SETTINGS["mltp_alpha_scale"]
    (grads_0, stats_0), (grads_1, stats_1) = [core_step_gradient(model, rank["batches"], cfg, alpha) for rank in ranks]
    mean = {n: (grads_0[n] + grads_1[n]) / 2 for n in grads_0}
    for rank in ranks:
        assert_grads_close(rank["grads"][0], mean, rtol=1e-5)
        # logged on every process: the mean over all 4 pairs of both processes
        (log,) = [log for log in rank["log_history"] if "loss" in log]
        assert log["mltp_loss_j"] == pytest.approx(np.mean([s.loss_j for s in stats_0 + stats_1]), rel=1e-5)


# ---- arguments

@pytest.mark.parametrize("bad, words", [
    (dict(mltp_gamma=0.0), "gamma"),
    (dict(mltp_gamma=1.5), "gamma"),
    (dict(mltp_variant=""), "variant"),
    (dict(mltp_second_order="hessian"), "second_order"),
    (dict(mltp_bn_update="never"), "bn_update"),
    (dict(mltp_alpha=-0.1), "alpha .*must be a finite number >= 0"),
    (dict(mltp_alpha=float("nan")), "alpha .*must be a finite number >= 0"),
    (dict(mltp_alpha_scale=None), "alpha_scale must be"),
    (dict(mltp_alpha_rule="adaptive"), "alpha_rule must be one of optimizer, lr, fixed, clip, update, relative"),
    (dict(mltp_alpha_rule="fixed"), "alpha_rule='fixed' needs alpha"),
    (dict(mltp_alpha=0.1, mltp_alpha_rule="lr"), "set alpha_rule='fixed' too"),
    (dict(mltp_relative_step=0.0), "relative_step must be a positive number"),
    (dict(train_sampling_strategy="batch_rebalance"), "needs each loader batch to hold 2B"),
])
def test_bad_arguments_raise(bad, words, tmp_path):
    with pytest.raises(MLTPConfigError, match=words):
        mltp_args(tmp_path, **bad)


@pytest.mark.parametrize("variant, words", [("conv", "selects no trainable parameter"), ("layer9.*", "matches no")])
def test_variant_that_selects_nothing_raises_at_construction(variant, words, tmp_path):
    with pytest.raises(MLTPConfigError, match=words):
        MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, mltp_variant=variant))


def test_gradient_checkpointing_is_refused(tmp_path):
    for name in ("activation_checkpointing", "gradient_checkpointing"):   # transformers 5's name, and the old one
        if name in MLTPTrainingArguments.__dataclass_fields__:
            with pytest.raises(MLTPConfigError, match="checkpointing cannot be combined with MLTP"):
                MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **{name: True}))


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(MLTPConfigError, match="MLTPTrainingArguments"):
        MLTPTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


def test_too_small_train_dataset_is_a_clear_error(tmp_path):
    trainer = MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, per_device_train_batch_size=8),
                          train_dataset=token_data(15))
    with pytest.raises(MLTPConfigError, match="2 \\* per_device_train_batch_size = 16"):
        trainer.train()


def test_arguments_are_saved_and_parsed(tmp_path):
    args = mltp_args(tmp_path, mltp_variant="fc", mltp_gamma=0.3, mltp_alpha=0.01, mltp_second_order="fd")
    saved = args.to_dict()
    assert {k: saved[k] for k in ("mltp_variant", "mltp_gamma", "mltp_alpha", "mltp_second_order")} == \
        dict(mltp_variant="fc", mltp_gamma=0.3, mltp_alpha=0.01, mltp_second_order="fd")
    assert args.mltp_config == MLTPConfig(variant="fc", gamma=0.3, second_order="fd", alpha_rule="fixed", alpha=0.01)
    (parsed,) = HfArgumentParser(MLTPTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--mltp_variant", "layer4.*,fc.*", "--mltp_alpha", "0.05",
         "--mltp_bn_update", "first", "--report_to", "none"])
    assert (parsed.mltp_variant, parsed.mltp_alpha, parsed.mltp_bn_update) == ("layer4.*,fc.*", 0.05, "first")
    assert parsed.mltp_alpha_scale == 1.0 and parsed.mltp_gamma == 0.5


def test_plain_module_cross_entropy_and_label_smoothing(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1)
    trainer = MLTPTrainer(model=model, args=mltp_args(tmp_path, label_smoothing_factor=0.1))
    batch = {"pixel_values": torch.randn(4, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(loss, F.cross_entropy(model(batch["pixel_values"]), batch["labels"],
                                                     label_smoothing=0.1))
    assert outputs["logits"].shape == (4, 3) and trainer.label_names == ["labels"]
    with pytest.raises(MLTPConfigError, match="no 'labels'"):
        trainer.compute_loss(model, {"pixel_values": batch["pixel_values"]})


@pytest.mark.slow
def test_finetune_example_runs(tmp_path):
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "trainer_finetune.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, example, "--output-dir", str(tmp_path), "--model", "test_resnet",
                           "--train-samples", "256", "--epochs", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "eval_accuracy" in done.stdout
    assert (tmp_path / "test_resnet.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()


class _Stream(torch.utils.data.IterableDataset):
    """A dataset without __len__ whose last loader batch is odd (27 samples in batches of 2B = 8)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_iterable_dataset_with_an_odd_last_batch_trains(tmp_path):
    data = token_data(27)
    rows = [{"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"]),
             "labels": torch.tensor(r["label"])} for r in data]
    args = mltp_args(tmp_path, per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3, logging_steps=1,
                     mltp_variant="fc")
    trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=_Stream(rows))
    trainer.train()
    sizes = [len(b["input_ids"]) for b in trainer.batches]
    assert sizes[:4] == [8, 8, 8, 3] and trainer.state.global_step == 8
    # the odd batch trained on its first 2 samples, one per task: a finite loss was logged for it
    assert np.isfinite(training_logs(trainer)[3]["loss"]) and training_logs(trainer)[3]["loss"] > 0
    assert all(torch.isfinite(g).all() for grads in trainer.grads for g in grads.values())


def test_the_mltp_step_state_goes_with_the_checkpoint(tmp_path):
    settings = dict(per_device_train_batch_size=8, max_steps=2, save_strategy="steps", save_steps=2,
                    learning_rate=3e-3, mltp_variant="fc")     # AdamW, the default rule: Adam's last update
    first = MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **settings), train_dataset=token_data(64))
    first.train()
    saved = torch.load(tmp_path / "checkpoint-2" / "mltp_step.pt", weights_only=True)
    assert saved == first._mltp_step.state_dict() and saved["inner_step"]["last_update"]
    assert saved["second_order"] in ("exact", "fd")
    resumed = MLTPTrainer(model=tiny_bert(), args=mltp_args(tmp_path, **{**settings, "max_steps": 3}),
                          train_dataset=token_data(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed._step_state == saved
    assert resumed._mltp_step.cfg.second_order == saved["second_order"]   # auto's choice is kept
