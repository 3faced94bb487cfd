"""Fine-tune a timm model from a local weights file with MLTPTrainer, the way Hugging Face's image-classification
example does it: a `datasets` image dataset, `with_transform`, a collator and accuracy.

    python examples/trainer_finetune.py                                  # writes a stand-in weights file first
    python examples/trainer_finetune.py --model resnet18 --weights resnet18.safetensors

Runs offline on the Fashion-MNIST subset shipped with timm_mltp, in under a minute on 2 CPU cores (5,000 images,
2 epochs, about 80% test accuracy). Where other processes keep the cores busy, run it with OMP_NUM_THREADS=1:
small models on oversubscribed cores slow down many times over.
Without --weights it saves the architecture's freshly initialised ImageNet (1000-class) weights and starts from
those, so the numbers are those of a short training from scratch; give it real pretrained weights to fine-tune.
"""
import argparse
import os

import datasets
import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from timm_mltp import MLTPTrainer, MLTPTrainingArguments
from timm_mltp.data import DEFAULT_DATASET


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10t", help="timm architecture")
    parser.add_argument("--weights", help="local weights file (.safetensors, .pth); default: write a stand-in")
    parser.add_argument("--output-dir", default="out/trainer_finetune")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train-samples", type=int, default=5000, help="0: all 10,000")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="size of one task; a step uses twice as many")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variant", default="fc", help="MLTP variant: none, full, conv, fc, fo, head or patterns")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (a GPU, or a CPU with bf16)")
    return parser.parse_args()


def stand_in_weights(model_name: str, output_dir: str) -> str:
    """What a downloaded checkpoint would be: here the architecture's freshly initialised weights."""
    path = os.path.join(output_dir, f"{model_name}.safetensors")
    if not os.path.exists(path):
        os.makedirs(output_dir, exist_ok=True)
        save_file(timm.create_model(model_name).state_dict(), path)
    return path


def main():
    args = parse_args()
    data = datasets.load_dataset("parquet", data_files={split: str(DEFAULT_DATASET / f"{split}.parquet")
                                                        for split in ("train", "test")})
    class_names = data["train"].features["label"].names

    # the local file stands in for the hub weights; timm drops its 1000-class classifier for our 10 classes
    weights = args.weights or stand_in_weights(args.model, args.output_dir)
    model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                              num_classes=len(class_names))

    config = resolve_data_config({"input_size": (3, args.img_size, args.img_size), "crop_pct": 1.0}, model=model)
    train_tf = create_transform(**config, is_training=True, scale=(0.8, 1.0), hflip=0.0, color_jitter=0.0)
    eval_tf = create_transform(**config)

    def train_transforms(batch):
        batch["pixel_values"] = [train_tf(image.convert("RGB")) for image in batch["image"]]
        return batch

    def eval_transforms(batch):
        batch["pixel_values"] = [eval_tf(image.convert("RGB")) for image in batch["image"]]
        return batch

    train = data["train"].shuffle(seed=0)
    if args.train_samples:
        train = train.select(range(args.train_samples))
    train, test = train.with_transform(train_transforms), data["test"].with_transform(eval_transforms)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
                "labels": torch.tensor([example["label"] for example in examples])}

    def compute_metrics(prediction):
        return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}

    training_args = MLTPTrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=200,
        learning_rate=args.lr, num_train_epochs=args.epochs, warmup_steps=5, eval_strategy="epoch",
        save_strategy="no", logging_steps=10, report_to="none",
        bf16=args.bf16, mltp_variant=args.variant, mltp_gamma=0.5)   # alpha: the default rule follows AdamW's real step
    # no remove_unused_columns=False or label_names needed: MLTPTrainer handles a logits-only timm module
    trainer = MLTPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          data_collator=collate_fn, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_model()  # model.safetensors in output_dir, loadable with pretrained_cfg_overlay=dict(file=...)
    trainer.accelerator.end_training()   # every process leaves its process group before it exits (torchrun)


if __name__ == "__main__":
    main()
