"""recipes/train.py end to end: shipped and local datasets, outputs timm can load, resume after SIGKILL,
two processes, fine-tuning from a weights file, and every bad input failing early without a traceback."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from timm_mltp import MLTPConfig, mltp_backward, split_tasks
from timm_mltp.data import DEFAULT_DATASET
from timm_mltp.engine import SUMMARY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "recipes" / "train.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
QUICK = ["--model", "test_resnet", "--epochs", "1", "-b", "16", "--workers", "0", "--no-progress"]


def run(args, tmp_path, check=True, **kw):
    result = subprocess.run(TRAIN + args + ["--output", str(tmp_path)], env=ENV, capture_output=True, text=True,
                            timeout=600, **kw)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def small_parquet(tmp_path, n_train=96, n_test=64, mode=None):
    """A few shipped Fashion-MNIST images as a local parquet folder, optionally converted to `mode`."""
    folder = tmp_path / "parquet_data"
    folder.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        ds = datasets.load_dataset("parquet", data_files=str(DEFAULT_DATASET / f"{split}.parquet"), split="train")
        ds = ds.select(range(n)).rename_columns({"image": "img", "label": "fine_label"})
        if mode:
            ds = ds.map(lambda ex: {"img": ex["img"].convert(mode)})
        ds.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_default_dataset_trains_and_writes_timm_loadable_outputs(tmp_path):
    run(QUICK + ["--max-train-samples", "512", "--experiment", "e", "--variant", "full"], tmp_path)
    out = tmp_path / "e"
    assert {"args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == SUMMARY_COLUMNS       # timm's columns, the MLTP statistics, unreadable samples skipped
    assert SUMMARY_COLUMNS[:10] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                                    "loss_i", "loss_j", "grad_cosine", "alpha"]
    assert SUMMARY_COLUMNS[-2:] == ["train_skipped", "eval_skipped"] and rows[0]["train_skipped"] == "0"
    assert float(rows[0]["eval_top1"]) > 30            # 10 classes: chance is 10%
    assert 0 < float(rows[0]["alpha"]) <= 0.05           # the default rule on SGD: the learning rate (no clipping)
    assert 0 < float(rows[0]["relative_step"]) < 0.1 and 0 < float(rows[0]["update_ratio"]) < 1
    model = timm.create_model("test_resnet", num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model_best.pth.tar"), num_classes=10))
    saved = torch.load(out / "model_best.pth.tar", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_local_parquet_with_other_column_names_and_image_modes(tmp_path, mode):
    data = small_parquet(tmp_path, mode=mode)
    result = run(QUICK + ["--dataset", str(data), "--experiment", "p", "--variant", "fc"], tmp_path)
    assert "S = " in result.stdout and "second order in use: exact" in result.stdout
    assert (tmp_path / "p" / "summary.csv").is_file()


def test_imagefolder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, brightness in (("dark", 40), ("light", 215)):
            folder = tmp_path / "folder" / split / label
            folder.mkdir(parents=True)
            for k in range(40):
                pixels = np.clip(rng.normal(brightness, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    run(QUICK + ["--dataset", str(tmp_path / "folder"), "-b", "8", "--img-size", "32", "--experiment", "f",
                 "--epochs", "3"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "f" / "summary.csv")))
    assert float(rows[-1]["eval_top1"]) > 75           # two easy classes


def test_finetune_from_weights_file_reinitialises_a_different_head(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=5)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    result = run(QUICK + ["--max-train-samples", "64", "--pretrained-path", str(tmp_path / "weights.pth"),
                          "--experiment", "ft", "--lr", "0"], tmp_path)
    assert "re-initialised fc.weight, fc.bias" in result.stdout
    tuned = torch.load(tmp_path / "ft" / "last.pth.tar", weights_only=False)["state_dict"]
    # lr 0: the backbone is still the file's; the head is new and sized for 10 classes
    assert torch.equal(tuned["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert tuned["fc.weight"].shape[0] == 10


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    args = QUICK + ["--max-train-samples", "256", "--epochs", "2", "--drop", "0.2", "--lr", "0.02"]
    run(args + ["--experiment", "whole"], tmp_path)
    ckpt = tmp_path / "cut" / "last.pth.tar"
    proc = subprocess.Popen(TRAIN + args + ["--experiment", "cut", "--checkpoint-interval", "3", "--output",
                                            str(tmp_path)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["num_updates"] >= 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=False)
    assert 0 < state["step_in_epoch"] or state["epoch"] < 2, "the kill should land mid-run"
    run(args + ["--experiment", "cut", "--resume", str(ckpt)], tmp_path)
    whole = torch.load(tmp_path / "whole" / "last.pth.tar", weights_only=False)
    resumed = torch.load(ckpt, weights_only=False)
    assert resumed["num_updates"] == whole["num_updates"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert resumed["rows"] == whole["rows"]


@pytest.mark.parametrize("variant", ["full", "fo"])
def test_two_processes_average_each_process_mltp_gradient(tmp_path, variant):
    # accelerate launch starts several CPU processes only through mpirun; torchrun needs nothing more
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              str(ROOT / "tests" / "dist_step.py"), str(tmp_path), variant]
    result = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert not torch.equal(ranks[0]["batch"]["labels"], ranks[1]["batch"]["labels"])  # each its own shard
    expected = []
    for rank in ranks:                                  # each process's MLTP gradient, in one process
        model = timm.create_model("test_resnet", num_classes=10)
        model.load_state_dict(rank["initial"])
        model.train()
        task_i, task_j = split_tasks((rank["batch"]["pixel_values"], rank["batch"]["labels"]))
        mltp_backward(model, task_i, task_j, lambda m, b: F.cross_entropy(m(b[0]), b[1]), MLTPConfig(variant),
                      alpha=0.05)
        expected.append({n: p.grad for n, p in model.named_parameters()})
    for rank in ranks:
        for n, g in rank["grads"].items():
            mean = (expected[0][n] + expected[1][n]) / 2
            assert torch.allclose(g, mean, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet_50"], "unknown model 'resnet_50'; did you mean resnet50"),
    (["--variant", "ful"], "did you mean variant 'full'"),
    (["--variant", "layer9.*"], "'layer9.*' matches no trainable parameter of ResNet (test_resnet)"),
    (["--dataset", "/no/such/folder"], "does not exist"),
    (["--gamma", "0"], "gamma must be a number in (0, 1]"),
    (["--alpha", "-1"], "alpha (the fixed inner step size) must be a finite number >= 0"),
    (["--alpha-rule", "lr", "--alpha", "0.1"], "set alpha_rule='fixed' too"),
    (["--resume", "/no/such.pth.tar"], "--resume '/no/such.pth.tar' is not a file"),
    (["--pretrained-path", "/no/weights.pth"], "is not a file"),
    (["-b", "20000"], "fewer than one pair of batches"),
])
def test_bad_input_fails_early_with_a_message(tmp_path, capsys, args, message):
    sys.path.insert(0, str(ROOT / "recipes"))
    from train import main
    assert main(QUICK + args + ["--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = run(QUICK + ["--variant", "ful"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_missing_columns_are_listed(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    from train import main
    data = small_parquet(tmp_path)
    assert main(QUICK + ["--dataset", str(data), "--label-column", "target", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "target" in err and "fine_label" in err


def test_non_finite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    from timm_mltp.engine import TrainArgs, Trainer
    from timm_mltp.errors import MLTPConfigError
    trainer = Trainer(TrainArgs(model="test_resnet", epochs=1, batch_size=8, max_train_samples=128, workers=0,
                                output=str(tmp_path), experiment="nan", progress=False, max_bad_steps=3))

    def sometimes_nan(module, batch):
        loss = F.cross_entropy(module(batch[0]), batch[1])
        return loss * float("nan") if trainer.num_updates >= 2 else loss   # the first 2 steps are fine

    monkeypatch.setattr(trainer.step, "loss_fn", sometimes_nan)
    with pytest.raises(MLTPConfigError, match="3 non-finite losses in a row"):
        trainer.fit()
    assert trainer.num_updates == 2                      # the skipped steps changed nothing


def test_bf16_mixed_precision_run_with_fd_trains_as_float32_does(tmp_path):
    # a smooth model, where fd is accurate (on ReLU networks fd's term is noise in any precision)
    args = QUICK[2:] + ["--model", "test_convnext", "--max-train-samples", "512", "--second-order", "fd"]
    result = run(args + ["--mixed-precision", "bf16", "--experiment", "bf16"], tmp_path)
    assert "mixed precision bf16" in result.stdout and "second order in use: fd" in result.stdout
    run(args + ["--mixed-precision", "no", "--experiment", "fp32"], tmp_path)
    bf16, fp32 = (list(csv.DictReader(open(tmp_path / name / "summary.csv")))[0] for name in ("bf16", "fp32"))
    # measured: train loss 1.5905 vs 1.5945, test loss 1.2612 vs 1.2660, top-1 55.6 vs 54.8 (chance: 10)
    assert float(bf16["train_loss"]) == pytest.approx(float(fp32["train_loss"]), rel=0.02)
    assert float(bf16["eval_loss"]) == pytest.approx(float(fp32["eval_loss"]), rel=0.03)
    assert float(bf16["eval_top1"]) > 40
