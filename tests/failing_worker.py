"""The recipe under torchrun with one fault injected on one process (tests/test_jobs.py):

    torchrun --nproc_per_node 2 failing_worker.py disk|step RECIPE_ARGS...

disk: process 0's second checkpoint write finds the disk full; step: process 1's fifth pair raises."""
import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import torch  # noqa: E402
import train as recipe  # noqa: E402

from timm_mltp.step import MLTPStep  # noqa: E402

fault, rank = sys.argv[1], int(os.environ["RANK"])
calls = []
if fault == "disk" and rank == 0:
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)
    torch.save = save_until_the_disk_is_full
if fault == "step" and rank == 1:
    real_pair = MLTPStep.pair

    def pair_that_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected: a step failed on process 1")
        return real_pair(self, *args, **kwargs)
    MLTPStep.pair = pair_that_fails
sys.exit(recipe.main(sys.argv[2:]))
