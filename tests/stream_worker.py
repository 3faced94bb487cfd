"""Run by tests/test_streaming.py under torchrun: one epoch of the engine on streamed parquet shards (hfids/);
saves which training samples this process read (the SHA-1 of each image's bytes) and its final weights."""
import hashlib
import sys

import torch
import torch.distributed as dist

from timm_mltp.engine import TrainArgs, Trainer

out, data = sys.argv[1], sys.argv[2]
try:
    trainer = Trainer(TrainArgs(model="test_resnet", dataset=f"hfids/{data}", train_num_samples=256, img_size=32,
                                epochs=1, batch_size=16, workers=0, output=out, experiment="two", progress=False))
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    seen, read = [], trainer.train_set.transform

    def recording(row):
        seen.append(hashlib.sha1(row["image"]["bytes"]).hexdigest())
        return read(row)

    trainer.train_set.transform = recording
    result = trainer.fit()
    torch.save({"seen": seen, "world": world, "steps": result["optimizer_steps"],
                "weights": trainer.module.state_dict()}, f"{out}/rank{rank}.pt")
finally:   # leave the process group: a gloo process that exits inside one can abort at exit
    if dist.is_initialized():
        dist.destroy_process_group()
