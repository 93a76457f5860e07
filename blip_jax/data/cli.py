"""`blip-jax build-dataset`: build a tfds dataset from BLIP annotation JSON, or the synthetic one.

  blip-jax build-dataset --format blip-json --annotations train=coco_karpathy_train.json \
      coco_karpathy_val.json coco_karpathy_test.json --image-root /data/coco --name coco_karpathy \
      --data-dir ~/tensorflow_datasets
  blip-jax build-dataset --format synthetic-shapes --data-dir ~/tensorflow_datasets

A bare annotation file goes to the split its name contains (train/val/test, else train);
`split=FILE` chooses explicitly. Several files of one split are concatenated.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["blip-json", "synthetic-shapes"], default="blip-json",
                        help="annotation layout to read (default blip-json)")
    parser.add_argument("--annotations", nargs="+", default=[], metavar="[SPLIT=]FILE",
                        help="BLIP annotation JSON file(s)")
    parser.add_argument("--image-root", default=None, help="directory image paths are relative to")
    parser.add_argument("--name", default=None, help="dataset name (config.input.name)")
    parser.add_argument("--data-dir", default=None, help="tfds data_dir (default $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)")
    parser.add_argument("--max-side", type=int, default=0,
                        help="downscale images whose longer side exceeds this (0 = keep)")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding images")


def _print_summary(summary: dict) -> None:
    print(f"built {summary['name']} ({summary.get('kind', 'captions')}) at {summary['path']}")
    for split, count in summary["examples"].items():
        print(f"  {split}: {count} examples")
    for key in ("skipped_images", "dropped_captions", "dropped_images_without_captions",
                "dropped_questions", "dropped_answers"):
        if key in summary:
            print(f"  {key.replace('_', ' ')}: {summary[key]}")
    if summary.get("skipped_by_reason"):
        print(f"  skipped by reason: {json.dumps(summary['skipped_by_reason'])}")
    if summary.get("skipped_file"):
        print(f"  skipped images listed in {summary['skipped_file']}")


def run(args: argparse.Namespace) -> int:
    """Builds the dataset and prints a summary; returns 0, or 2 with a one-line error."""
    from blip_jax.data import datasets
    data_dir = datasets.default_data_dir(args.data_dir)
    try:
        if args.format == "synthetic-shapes":
            from blip_jax.data.builders import synthetic_shapes
            builder = synthetic_shapes.ensure_built(data_dir)
            summary = {"name": "synthetic_shapes", "path": builder.data_dir,
                       "examples": {s: i.num_examples for s, i in builder.info.splits.items()}}
        else:
            missing = [flag for flag, value in (("--annotations", args.annotations),
                                                ("--image-root", args.image_root), ("--name", args.name))
                       if not value]
            if missing:
                raise ValueError(f"--format blip-json needs {' '.join(missing)}")
            from blip_jax.data.builders import blip_json
            summary = blip_json.build(args.name, blip_json.parse_annotation_args(args.annotations),
                                      args.image_root, data_dir, args.max_side, args.workers)
    except ValueError as error:
        print(f"build-dataset: error: {error}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blip-jax build-dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
