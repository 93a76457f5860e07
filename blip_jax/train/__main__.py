"""python -m blip_jax.train --config configs/pretrain.py:tiny --workdir runs/tiny [--config.x=y ...]"""
import sys

from blip_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
