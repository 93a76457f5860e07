"""`blip-jax <command>`: a thin dispatcher. Each command lives in a library module that exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Keep in sync with README.md.
COMMANDS = {
    "pretrain": ("blip_jax.train.cli", "pre-train BLIP (ITC + ITM + LM) from a config"),
    "convert": ("blip_jax.convert.cli", "convert HF / Salesforce weights to a blip-jax checkpoint"),
    "build-dataset": ("blip_jax.data.cli", "build a tfds dataset (synthetic shapes, BLIP JSON annotations)"),
    "caption": ("blip_jax.inference", "caption images (beam search or nucleus sampling)"),
    "ask": ("blip_jax.inference", "answer a question about an image (VQA)"),
    "match": ("blip_jax.inference", "ITM probability and ITC cosine of image-text pairs"),
    "classify": ("blip_jax.inference", "zero-shot classification with ITC (+ ITM re-ranking)"),
}


def _load(command: str):
    module = importlib.import_module(COMMANDS[command][0])
    # A module serving several commands exposes `<command>_add_arguments` / `<command>_run`.
    prefix = command.replace("-", "_") + "_"
    add = getattr(module, prefix + "add_arguments", None) or module.add_arguments
    run = getattr(module, prefix + "run", None) or module.run
    return add, run


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="blip-jax", description="BLIP in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nblip-jax: unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    add_arguments, run = _load(command)
    command_parser = argparse.ArgumentParser(prog=f"blip-jax {command}", description=COMMANDS[command][1])
    add_arguments(command_parser)
    if getattr(add_arguments, "accepts_unknown", False):
        args, unknown = command_parser.parse_known_args(rest)
        args.unknown_args = unknown
    else:
        args = command_parser.parse_args(rest)
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
