"""benchmarks/generalization.py: the quick matrix fills a CSV and a rerun skips it, the report turns a CSV
into the doc and the plot, and the SAM step taken through the engine is SAM's."""
import copy
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "generalization.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("generalization", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def bench(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quick_matrix_appends_rows_and_a_rerun_skips_them(tmp_path):
    pytest.importorskip("pytorch_optimizer")  # SAM: a benchmark-only dependency
    g = load_benchmark()
    results = tmp_path / "quick.csv"
    bench("--quick", "--csv", str(results))
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == g.COLUMNS
    assert sorted(r["method"] for r in rows) == sorted(g.QUICK["methods"])
    for row in rows:
        steps = int(row["optimizer_steps"])
        assert steps == g.QUICK["train_samples"] // (2 * g.BATCH_SIZE)
        assert int(row["samples_seen"]) == steps * 2 * g.BATCH_SIZE   # the same 2B per step for every method
        assert 0 <= float(row["final_top1"]) <= float(row["best_top1"]) <= 100
    assert rows[[r["method"] for r in rows].index("sam")]["mean_grad_cosine"] == ""
    before = results.read_text()
    out = bench("--quick", "--csv", str(results))
    assert f"{len(rows)} already in" in out and "0 to go" in out
    assert results.read_text() == before


def synthetic_rows(g):
    """Two models, three methods, three seeds, and a sensitivity grid; `full` gains 1 point on every seed."""
    rows = []
    for model in ("net_a", "net_b"):
        for seed in range(3):
            for method, gain, seconds in (("none", 0.0, 10.0), ("full", 1.0, 25.0), ("sam", 0.3 * (seed - 1), 18.0)):
                rows.append(dict(model=model, method=method, seed=seed, top1=80 + seed + gain, seconds=seconds))
    rows += [dict(model="net_a", method="full", seed=0, top1=79 + gamma + a, seconds=25.0, gamma=gamma, alpha_scale=a)
             for gamma in g.GAMMAS for a in g.ALPHA_SCALES if (gamma, a) != (0.5, 1.0)]
    return [{"device": "cpu test", "method": r["method"], "model": r["model"], "seed": r["seed"], "epochs": 2,
             "train_samples": 1000, "samples_seen": 1920, "optimizer_steps": 15, "wall_seconds": 2 * r["seconds"],
             "final_top1": r["top1"], "best_top1": r["top1"] + 0.5, "test_loss": 0.5, "final_train_loss": 0.4,
             "mean_grad_cosine": "" if r["method"] == "sam" else 0.3, "gamma": r.get("gamma", 0.5),
             "alpha_scale": r.get("alpha_scale", 1.0), "batch_size": 64, "lr": 0.05} for r in rows]


def test_report_writes_the_doc_and_the_plot_from_a_csv(tmp_path):
    pytest.importorskip("matplotlib")
    g = load_benchmark()
    results, doc = tmp_path / "results.csv", tmp_path / "docs" / "generalization.md"
    for row in synthetic_rows(g):
        g.append_row(results, row)
    bench("--report", "--csv", str(results), "--doc", str(doc))
    text = doc.read_text()
    assert "| net_a | full | 82.00 ± 1.00 (n=3) |" in text
    assert "| 1.00 ± 0.00 (n=3) | 2.50x (25.0 s) |" in text           # paired difference, cost vs none
    assert "### Sensitivity: full on net_a" in text
    assert "full: +1.00 points vs `none` over 3 paired seed(s), the mean exceeds" in text
    assert "sam: +0.00 points vs `none` over 3 paired seed(s), within the seed-to-seed std" in text
    assert doc.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sam_step_is_sgd_with_the_gradient_at_the_perturbed_weights(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    g = load_benchmark()
    run = g.Run("sam", "test_resnet", seed=0, epochs=1, train_samples=256)
    trainer = g.SAMTrainer(g.train_args(run, None, str(tmp_path)))
    batch = next(iter(trainer.train_loader))
    model = trainer.module.train()
    # the reference: SAM written out (Foret et al. 2021, Algorithm 1) on a copy, then the engine's SGD settings
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    loss = lambda: torch.nn.functional.cross_entropy(ref(batch["pixel_values"]), batch["labels"])  # noqa: E731
    grads = torch.autograd.grad(loss(), params)
    norm = torch.stack([x.norm() for x in grads]).norm() + 1e-12
    with torch.no_grad():
        for p, grad in zip(params, grads):
            p.add_(grad, alpha=g.SAM_RHO / norm.item())          # w + e(w)
    with g._frozen_running_stats(ref):
        grads_at_e = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, grad in zip(params, grads):
            p.sub_(grad, alpha=g.SAM_RHO / norm.item())          # back to w
    for p, grad in zip(params, grads_at_e):
        p.grad = grad
    position = {id(p): i for i, p in enumerate(model.parameters())}
    settings = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    torch.optim.SGD([{"params": [params[position[id(p)]] for p in group["params"]],
                      **{k: group[k] for k in settings}} for group in trainer.optimizer.param_groups]).step()

    stats = trainer.train_step(batch)
    assert stats is not None and trainer.num_updates == 1
    for (name, p), expected in zip(model.named_parameters(), params):
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-4, msg=name)
    for (name, b), expected in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, expected, msg=name)
