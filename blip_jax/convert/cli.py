"""`blip-jax convert SRC OUT [--task caption|retrieval|vqa|pretrain] [--image-size N] [--dtype D]`

SRC: a transformers BLIP directory, a Salesforce .pth, or a blip-jax checkpoint directory.
OUT: a blip-jax checkpoint directory (config.json + params.safetensors) that `blip_jax.load` and every
other command read. With --to hf, OUT is written in transformers format instead (config.json +
model.safetensors for Blip*.from_pretrained).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

TASK_CHOICES = ("caption", "retrieval", "vqa", "pretrain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="transformers BLIP dir | Salesforce .pth | blip-jax checkpoint dir")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--task", choices=TASK_CHOICES, default=None,
                        help="model to build (default: what SRC holds; a pre-training .pth loads as any task)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="target resolution; pos_embed is resampled (torch bicubic) when it differs")
    parser.add_argument("--to", choices=("blip-jax", "hf"), default="blip-jax",
                        help="output format (default blip-jax; hf = transformers config.json + model.safetensors)")
    parser.add_argument("--force", action="store_true", help="write into OUT even if it is a non-empty directory")


def run(args: argparse.Namespace) -> int:
    import jax

    from blip_jax.api import load

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        print(f"blip-jax convert: {args.out} is not empty: choose a new directory or pass --force", file=sys.stderr)
        return 2
    try:
        bundle = load(args.src, task=args.task, image_size=args.image_size)
    except (ValueError, FileNotFoundError, TypeError, pickle.UnpicklingError) as error:
        print(f"blip-jax convert: {error}", file=sys.stderr)
        return 1
    if args.to == "hf":
        bundle.export_hf(args.out)
    else:
        bundle.save(args.out)
    count = sum(int(x.size) for x in jax.tree.leaves(bundle.params))
    print(f"wrote {args.out} ({args.to}): task={bundle.task}, {count / 1e6:.1f}M parameters, "
          f"ViT {bundle.config.vision.width}x{bundle.config.vision.depth} at {bundle.config.vision.image_size}px")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blip-jax convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
