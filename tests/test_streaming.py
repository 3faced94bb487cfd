"""Streamed data (timm's hfids/ and wds/) and jobs beyond one process layout: parquet and webdataset shards, each
process its own part, an exact resume after SIGTERM, two "nodes" on this host, and a resume on another number of
processes (README: Distributed; docs/distributed.md)."""
import csv
import hashlib
import io
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch

from test_recipe import ENV, QUICK, ROOT, run
from test_reliability import (NOT_AN_IMAGE, TRUNCATED, assert_same_run, parquet_with_broken_images,
                              stopped_by_sigterm)
from timm_mltp.data import DEFAULT_DATASET

sys.path.insert(0, str(ROOT / "recipes"))
import train as recipe  # noqa: E402

datasets.disable_progress_bars()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STREAM = QUICK + ["--img-size", "32", "--log-interval", "1"]


def write_shards(folder: Path, kind: str = "parquet", n_train: int = 256, n_test: int = 64, shards: int = 4) -> Path:
    """The first shipped images as `shards` training shards and one test shard: parquet files, or webdataset
    tars (an image.png and its class.cls per sample)."""
    folder.mkdir(parents=True)
    for split, n, parts in (("train", n_train, shards), ("test", n_test, 1)):
        ds = datasets.load_dataset("parquet", data_files=str(DEFAULT_DATASET / f"{split}.parquet"), split="train")
        ds = ds.select(range(n))
        for k in range(parts):
            part = ds.shard(parts, k, contiguous=True)
            if kind == "parquet":
                part.to_parquet(str(folder / f"{split}-{k:05d}.parquet"))
                continue
            with tarfile.open(folder / f"{split}-{k:05d}.tar", "w") as tar:
                for i, row in enumerate(part.cast_column("image", datasets.Image(decode=False))):
                    for ext, data in (("png", row["image"]["bytes"]), ("cls", str(row["label"]).encode())):
                        info = tarfile.TarInfo(f"{split}{k:02d}{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return folder


def summary(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path / "summary.csv")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ---- one process: parquet shards through hfids/, webdataset shards through wds/ -------------------------------

def test_parquet_shards_stream_through_hfids(tmp_path, capsys):
    data = write_shards(tmp_path / "shards")
    argv = STREAM + ["--dataset", f"hfids/{data}", "--train-num-samples", "192", "--output", str(tmp_path)]
    assert recipe.main(argv + ["--experiment", "s"]) == 0
    out = capsys.readouterr().out
    assert "each step: 2 x 16 samples per process, 6 steps per epoch" in out     # 192 samples, 2B = 32
    (row,) = summary(tmp_path / "s")
    assert float(row["eval_top1"]) > 10 and row["train_skipped"] == "0"      # evaluated on the streamed test split
    state = torch.load(tmp_path / "s" / "last.pth.tar", weights_only=True)
    assert state["num_updates"] == 6 and state["processes"] == 1
    # a stream has no size of its own, and map-style options do not apply to it
    assert recipe.main(STREAM + ["--dataset", f"hfids/{data}", "--output", str(tmp_path)]) == 2
    assert "a stream does not say how many samples it holds; give --train-num-samples N" in capsys.readouterr().err
    assert recipe.main(argv + ["--max-train-samples", "64"]) == 2
    assert "is streamed: give --train-num-samples" in capsys.readouterr().err
    assert recipe.main(QUICK + ["--train-num-samples", "64", "--output", str(tmp_path)]) == 2
    assert "this map-style split knows its size: use --max-train-samples" in capsys.readouterr().err


def test_webdataset_shards_stream_through_wds(tmp_path, capsys):
    data = write_shards(tmp_path / "tars", kind="wds")
    argv = STREAM + ["--dataset", f"wds/{data}", "--train-num-samples", "128", "--output", str(tmp_path)]
    assert recipe.main(argv) == 2        # .cls labels are integer ids: the class count cannot be read off a stream
    assert "give --num-classes" in capsys.readouterr().err
    assert recipe.main(argv + ["--num-classes", "10", "--experiment", "w", "--workers", "2"]) == 0
    assert "4 steps per epoch" in capsys.readouterr().out
    (row,) = summary(tmp_path / "w")
    assert float(row["eval_top1"]) > 10


def test_unreadable_streamed_samples_are_skipped_and_counted(tmp_path, caplog):
    data = parquet_with_broken_images(tmp_path, {TRUNCATED: "truncated", NOT_AN_IMAGE: "garbage"})
    argv = STREAM + ["--dataset", f"hfids/{data}", "--train-num-samples", "256", "--shuffle-buffer", "0",
                     "--output", str(tmp_path), "--experiment", "b"]
    assert recipe.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "skipped an unreadable sample" in r.getMessage()]
    assert [w.split(": ")[1] for w in warnings] == [f"split 'train', process 0, sample {k} of epoch 0"
                                                    for k in (TRUNCATED, NOT_AN_IMAGE)]   # the stream's order
    (row,) = summary(tmp_path / "b")
    assert row["train_skipped"] == "2"


# ---- exact resume of a streamed run ---------------------------------------------------------------------------

def test_a_streamed_run_resumes_exactly_after_sigterm(tmp_path):
    """SIGTERM mid-epoch, then --resume: the weights of the uninterrupted run, to the bit. The cut run reads with two
    loader workers, the whole one with none: the batches are the same whatever the loader's workers."""
    data = write_shards(tmp_path / "shards")
    args = STREAM + ["--dataset", f"hfids/{data}", "--train-num-samples", "128", "--epochs", "2", "--drop", "0.2",
                     "--shuffle-buffer", "100"]
    run(args + ["--experiment", "whole"], tmp_path)
    args += ["--workers", "2"]
    _, last = stopped_by_sigterm(args, tmp_path, "cut", "Train: 0 [   1/")
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["step_in_epoch"] < 4, "the stop lands mid-epoch"
    run(args + ["--experiment", "cut", "--resume", str(last)], tmp_path)
    assert_same_run(tmp_path / "whole" / "last.pth.tar", last)


# ---- several processes ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_read_disjoint_parts_of_the_stream(tmp_path):
    data = write_shards(tmp_path / "shards")
    done = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "stream_worker.py"),
                                      str(tmp_path), str(data)], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]   # 256 / (2 x 32)
    seen = [set(r["seen"]) for r in ranks]
    assert [len(r["seen"]) for r in ranks] == [128, 128] and seen[0].isdisjoint(seen[1])
    shipped = datasets.load_dataset("parquet", data_dir=str(data), split="train").cast_column(
        "image", datasets.Image(decode=False))
    assert seen[0] | seen[1] == {hashlib.sha1(row["image"]["bytes"]).hexdigest() for row in shipped}
    for name, tensor in ranks[0]["weights"].items():     # one model: the processes' gradients were averaged
        assert torch.equal(tensor, ranks[1]["weights"][name]), name


def launch_two_nodes(args: list, tmp_path: Path, experiment: str) -> None:
    """The recipe on two "nodes" of one process each: two torchrun launchers meeting at a c10d rendezvous on
    localhost, as two machines of a cluster would."""
    endpoint = f"localhost:{free_port()}"
    launch = TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                         endpoint, "--rdzv_id", experiment, str(ROOT / "recipes" / "train.py")]
    nodes = [subprocess.Popen(launch + args + ["--experiment", experiment, "--output", str(tmp_path)], env=ENV,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, results):
        assert node.returncode == 0, err[-4000:]


@pytest.mark.slow
def test_two_nodes_train_checkpoint_and_resume_exactly(tmp_path):
    data = write_shards(tmp_path / "shards")
    args = STREAM + ["--dataset", f"hfids/{data}", "--train-num-samples", "256", "--epochs", "2",
                     "--recovery-interval", "3"]
    launch_two_nodes(args, tmp_path, "whole")
    whole = tmp_path / "whole"
    recovery = torch.load(whole / "recovery-1-2.pth.tar", weights_only=True)     # epoch 1, after its 3rd step
    assert recovery["processes"] == 2 and recovery["epoch"] == 1 and recovery["step_in_epoch"] == 3
    launch_two_nodes(args + ["--resume", str(whole / "recovery-1-2.pth.tar")], tmp_path, "resumed")
    assert_same_run(whole / "last.pth.tar", tmp_path / "resumed" / "last.pth.tar")


@pytest.mark.slow
def test_a_run_of_two_processes_continues_on_one_and_says_what_it_could_not_keep(tmp_path):
    data = write_shards(tmp_path / "shards")
    args = STREAM + ["--dataset", f"hfids/{data}", "--train-num-samples", "256", "--epochs", "2",
                     "--recovery-interval", "3"]
    two = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", str(ROOT / "recipes" / "train.py")]
                         + args + ["--experiment", "two", "--output", str(tmp_path)], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    checkpoint = tmp_path / "two" / "recovery-1-2.pth.tar"        # epoch 1 after 3 of its 4 steps on 2 processes
    one = run(args + ["--experiment", "one", "--resume", str(checkpoint)], tmp_path)
    (line,) = [x for x in one.stdout.splitlines() if x.startswith("resumed on 1 process(es) a run of 2")]
    # 3 steps x 2 processes x 32 samples = 192 samples of epoch 1 taken: step 6 of the 8 one process takes
    assert "kept the weights, optimizer, schedule and the 192 samples of epoch 1 taken (now step 6, update 14)" in line
    assert "not kept: the order of the rest of epoch 1: the stream is now split into 1 part(s) instead of 2" in line
    state = torch.load(tmp_path / "one" / "last.pth.tar", weights_only=True)
    assert state["processes"] == 1 and state["epoch"] == 2 and state["num_updates"] == 16   # 2 epochs of 8 steps
    assert [r["epoch"] for r in summary(tmp_path / "one")] == ["0", "1"]
    assert float(summary(tmp_path / "one")[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)   # the cosine ran to its end
