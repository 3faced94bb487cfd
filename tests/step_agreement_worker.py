"""Run by tests/test_step.py under torchrun with 2 CPU processes: `auto` is made to settle differently on the
two processes (process 0 never keeps fd, process 1 keeps it wherever it is accurate); after one pair both go
on with process 0's choice. Writes each process's second order to OUT/rankN.txt."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

import timm_mltp.auto
from timm_mltp import MLTPConfig, MLTPStep

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
timm_mltp.auto.FD_SPEEDUP = 0.0 if rank == 0 else 1e9
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 4)).double().train()   # smooth: fd is accurate
step = MLTPStep(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), MLTPConfig("full", auto_timing=True),
                lambda m, b: F.cross_entropy(m(b[0]), b[1]))
g = torch.Generator().manual_seed(rank)
stats = step.pair((torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)))
step.sync()
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
    f.write(f"{stats.second_order} {step.cfg.second_order} {step.state_dict()['second_order']}")
accelerator.end_training()   # leave the process group: a gloo process that exits inside one can abort at exit
