"""`blip-jax pretrain`: BLIP pre-training from a config file.

    blip-jax pretrain --config configs/pretrain.py:tiny --workdir runs/tiny [--config.x=y ...]
    python -m blip_jax.train --config configs/pretrain.py:tiny --workdir runs/tiny

`--config.x=y` overrides are parsed by ml_collections' config_flags (types follow the config).
Multi-host: pass --distributed (or set BLIP_JAX_DISTRIBUTED=1) to call jax.distributed.initialize()
first (SLURM, Cloud TPU, Open MPI and Kubernetes are auto-detected; see launch/).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="config file with an optional variant, e.g. configs/pretrain.py:tiny")
    parser.add_argument("--workdir", required=True, help="output directory (resumes if it has checkpoints)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() before touching devices (multi-host)")


# `blip-jax` passes unknown arguments (the --config.x=y overrides) through as args.unknown_args.
add_arguments.accepts_unknown = True


def load_config(config_arg: str, overrides=()):
    """The ConfigDict of `path[:variant]` with `--config.x=y` overrides applied (config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    path = config_arg.split(":", 1)[0]
    if not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist: pass e.g. configs/pretrain.py:tiny")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"unexpected argument(s) {bad}: overrides look like --config.total_steps=100")
    values = flags.FlagValues()
    argv = ["blip-jax", f"--config={config_arg}", *overrides]
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=False,
                                    sys_argv=argv)  # overrides are read from this argv, not sys.argv
    try:
        values(argv)
    except flags.Error as error:
        raise ValueError(str(error).splitlines()[0]) from None
    return values.config


def run(args) -> int:
    """Parse the config and pre-train; returns the exit code (errors: one line, exit code 2)."""
    if getattr(args, "distributed", False) or os.environ.get("BLIP_JAX_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()
    from blip_jax.train.validate import ConfigError
    try:
        config = load_config(args.config, list(getattr(args, "unknown_args", []) or []))
    except (ValueError, FileNotFoundError) as error:
        return _error(error)
    from blip_jax.train.loop import run as run_loop
    try:
        return run_loop(config, args.workdir)
    except (ConfigError, FileNotFoundError) as error:
        return _error(error)


def _error(error) -> int:
    message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
    print(f"blip-jax pretrain: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blip-jax pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args, args.unknown_args = parser.parse_known_args(argv)
    return run(args)
