"""Run by tests/test_recipe.py under `accelerate launch --num_processes 2 --cpu`: one engine step per
process; saves each process's pair of tasks, the initial weights and the gradient the optimizer sees."""
import sys

import torch

from timm_mltp.engine import TrainArgs, Trainer

out = sys.argv[1]
trainer = Trainer(TrainArgs(model="test_resnet", variant=sys.argv[2], epochs=1, batch_size=8, max_train_samples=64,
                            workers=0, output=out, experiment="dist", progress=False, seed=3))
rank = trainer.accelerator.process_index
batch = next(iter(trainer.train_loader))
initial = {k: v.clone() for k, v in trainer.module.state_dict().items()}
seen = {}
trainer.optimizer.optimizer.step = lambda *a, **k: seen.update(
    {n: p.grad.clone() for n, p in trainer.module.named_parameters()})
trainer.train_step(batch)
torch.save({"batch": batch, "initial": initial, "grads": seen, "world": trainer.accelerator.num_processes},
           f"{out}/rank{rank}.pt")
trainer.accelerator.end_training()   # leave the process group: a gloo process that exits inside one can abort at exit
