"""What the default inner-step rule costs under Adam: a `fo` step (pair, sync, AdamW step) under rule `update`
(the raw gradient at the last update's length) against `preconditioned` (what `optimizer` does under Adam:
Adam's direction for g_i, per element), interleaved in one process, medians of 20 after 4 warm steps.

    python benchmarks/rule_cost.py          # resnet18 and test_convnext, 32x32, B = 32, 2 threads
"""
import time, torch, timm, torch.nn.functional as F, statistics
from accelerate import Accelerator
from timm_mltp import MLTPConfig, MLTPStep
torch.set_num_threads(2)
acc = Accelerator(cpu=True)
ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])
for name in ("resnet18", "test_convnext"):
    runs = {}
    for rule in ("update", "preconditioned"):
        torch.manual_seed(0)
        m = timm.create_model(name, num_classes=10).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        step = MLTPStep(acc, m, opt, MLTPConfig("fo", alpha_rule=rule), ce, max_grad_norm=1.0)
        runs[rule] = (m, opt, step)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    times = {r: [] for r in runs}
    for i in range(24):                       # interleaved: machine noise hits both alike
        for rule, (m, opt, step) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True); step.pair(batch); step.sync(); opt.step()
            if i >= 4: times[rule].append(time.perf_counter() - t0)
    u, p = statistics.median(times["update"]), statistics.median(times["preconditioned"])
    print(f"{name}: fo + AdamW step, median of 20 interleaved, ms: update {1e3*u:.1f}, preconditioned {1e3*p:.1f} ({p/u:.3f}x)")
