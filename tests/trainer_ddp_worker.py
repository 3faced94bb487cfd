"""One process of tests/test_trainer.py's 2-process run: `torchrun --nproc_per_node 2 trainer_ddp_worker.py OUT`.

Each process trains one optimizer step (2 accumulated pairs of its own shard) and saves the loader batches it
saw, the gradient the optimizer saw and its logs, for the test to recompute with the core.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from test_trainer import RecordingTrainer, mltp_args, tiny_bert, token_data  # noqa: E402

DDP_SETTINGS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0,
                    learning_rate=1e-2, lr_scheduler_type="constant", mltp_variant="fc", mltp_alpha_rule="lr",
                    mltp_alpha_scale=10.0, mltp_second_order="exact",
                    logging_steps=1)


class SaveAfterStep(TrainerCallback):
    """The weights before the step (after DDP's broadcast), what this process trained on, the gradient, the logs."""

    def __init__(self, trainer, out):
        self.trainer, self.out = trainer, out

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}

    def on_train_end(self, args, state, control, **kwargs):
        torch.save({"initial": self.initial, "batches": self.trainer.batches, "grads": self.trainer.grads,
                    "log_history": state.log_history}, os.path.join(self.out, f"rank{args.process_index}.pt"))


def main(out):
    torch.set_num_threads(1)
    trainer = RecordingTrainer(model=tiny_bert(), args=mltp_args(out, **DDP_SETTINGS), train_dataset=token_data(64))
    trainer.add_callback(SaveAfterStep(trainer, out))
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    trainer.accelerator.end_training()   # leave the process group: a gloo process that exits inside one can abort


if __name__ == "__main__":
    main(sys.argv[1])
