"""BLIP pre-training (ITC + ITM + LM, blip.md §2.3) on one ('data', 'fsdp') mesh.

Variants (a few overrides of one base dict):
  tiny   CPU main job: the embedded `synthetic_shapes` dataset, a tiny ViT/MED, its own vocab;
         ~5 minutes on 2 idle CPU cores, zero-shot test t2i R@1 60.3% (README.md, "Pre-training").
         blip-jax pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
  base   ViT-B/16 at 224 with the original configs/pretrain.yaml values (batch 75 per GPU x 8,
         queue 57,600, alpha 0.4 over 2 epochs, AdamW 3e-4 wd 0.05, warmup 3,000 steps then x0.9
         per epoch for 20 epochs), DeiT-B and bert-base-uncased initialisation.
         blip-jax pretrain --config configs/pretrain.py:base --workdir gs://bucket/blip_base \
             --config.init_vision_from=/ckpt/deit_base_patch16_224 --config.init_text_from=/ckpt/bert-base-uncased
  large  ViT-L/16 (drop path 0.1, remat of the last 12 ViT blocks), otherwise as base.
         blip-jax pretrain --config configs/pretrain.py:large --workdir gs://bucket/blip_large

Durations are in steps; the original's epochs are converted once from the dataset size
(`config.num_train_examples`). Override anything with `--config.x=y`.
"""
from __future__ import annotations

import ml_collections

from blip_jax.models.config import model_config

VARIANTS = ("tiny", "base", "large")


def _input_config(name: str, image_size: int, batch_size: int):
    """The data pipeline's defaults for `name` (blip_jax.data.pipeline), adjusted for pre-training."""
    from blip_jax.data.pipeline import default_input_config
    config = default_input_config(name)
    config.image_size = image_size
    config.batch_size = batch_size       # kept equal to config.batch_size by the trainer
    config.max_length = 30               # the original's pre-training text length
    config.data_axes = ("data", "fsdp")  # the batch is split over the whole mesh
    return config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown pretrain variant {variant!r}: use one of {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.variant = variant

    # ---- the base dict: the original BLIP pre-training (configs/pretrain.yaml, blip.md §1.1) ----
    config.model = model_config("base", "base", 224)
    config.batch_size = 600                   # global: 75 per GPU x 8 GPUs (README example)
    # The original's 14M-image corpus (COCO + VG + CC3M + CC12M + SBU, CapFilt-bootstrapped), built
    # with `blip-jax build-dataset --format blip-json --name blip_pretrain_14m ...`.
    config.input = _input_config("blip_pretrain_14m", 224, config.batch_size)
    config.num_train_examples = 14_000_000    # converts the original's epochs to steps
    epochs = 20
    steps_per_epoch = config.num_train_examples // config.batch_size
    config.total_steps = epochs * steps_per_epoch
    config.seed = 42

    config.itc = dict(
        queue_size=57_600, momentum=0.995, alpha=0.4,
        alpha_ramp_steps=2 * steps_per_epoch,  # alpha ramps linearly over the first 2 epochs
        negatives="global",                    # 'local' = the original's per-GPU in-batch negatives
        duplicate_aware=False,                 # True: captions of the same image id are positives
        momentum_dropout=True,                 # the original runs its momentum encoders in train mode
    )
    config.itm = dict(negatives="global")
    config.lm = dict(label_smoothing=0.1)

    config.optim = dict(
        lr=3e-4, weight_decay=0.05, weight_decay_mask="all", b1=0.9, b2=0.999, eps=1e-8,
        schedule="blip_pretrain", warmup_steps=3000, warmup_lr=1e-6, min_lr=1e-6, decay_rate=0.9,
        steps_per_epoch=steps_per_epoch, clip_grad_norm=0.0, grad_accum_steps=1, freeze=(),
        mu_dtype="",
    )
    config.sharding = dict(fsdp=1, rules="replicate")   # rules: 'replicate' | 'fsdp' | [(regex, kind)]

    config.log_every_steps = 50
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3
    config.eval_every_steps = 0                # 0: only the final eval
    config.nan_policy = "skip"                 # 'skip': drop the update and count it; 'stop': save and exit
    config.max_consecutive_nan = 100           # 'skip' still stops after this many in a row

    config.init_from = ""                      # any blip_jax.load source (params only)
    config.resume = ""                         # another run's workdir / checkpoints dir / step dir
    config.init_vision_from = ""               # HF ViTModel/DeiTModel dir or timm .pth/.npz
    config.init_text_from = ""                 # HF BERT dir (bert-base-uncased)

    config.eval = dict(
        k_test=256,                            # ITM re-ranking of the ITC top k (0: ITC only)
        batch_size=256,
        num_captions=8,                        # greedy sample captions printed and saved
        caption_max_len=20,
    )
    config.debug = dict(nan_at_step=-1,        # inject a NaN image at this step (tests)
                        stop_at_step=-1)       # behave as if SIGTERM arrived after this step (tests)
    config.progress_bar = True

    if variant == "large":
        config.model = model_config("large", "base", 224)
        config.model.vision.drop_path_rate = 0.1
        config.model.remat.vision_layers = 12
        config.batch_size = 480                # the original ViT-L: 60 per GPU x 8 (queue 57,600 / 480)
        config.input.batch_size = config.batch_size
        steps_per_epoch = config.num_train_examples // config.batch_size
        config.total_steps = epochs * steps_per_epoch
        config.itc.alpha_ramp_steps = 2 * steps_per_epoch
        config.optim.lr = 2e-4
        config.optim.steps_per_epoch = steps_per_epoch
        config.model.dtype = "bfloat16"

    if variant == "tiny":
        # The CPU main job: a few minutes of training on 2 cores, then zero-shot retrieval on test.
        config.model = model_config("tiny", "tiny", 32)
        config.model.vision.update(patch_size=8, width=64, depth=3, num_heads=2, mlp_dim=128)
        config.model.text.update(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                 max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
        config.model.embed_dim = 64
        config.batch_size = 32
        config.input = _input_config("synthetic_shapes", 32, config.batch_size)
        config.input.max_length = 24
        config.num_train_examples = 6000
        steps_per_epoch = config.num_train_examples // config.batch_size
        config.total_steps = 3600
        config.itc.queue_size = 1024           # the queue supplies the negatives a small batch lacks
        config.itc.momentum = 0.99             # a small model moves fast: a shorter EMA horizon
        config.itc.alpha_ramp_steps = 2 * steps_per_epoch
        config.optim.update(schedule="warmup_cosine", lr=2e-3, warmup_steps=100, warmup_lr=1e-5,
                            min_lr=1e-5, weight_decay=0.05, steps_per_epoch=steps_per_epoch,
                            freeze=("^temp$",))  # Adam would move a scalar temp by ~lr per step
        config.log_every_steps = 50
        config.checkpoint_every_steps = 1000
        config.eval.update(k_test=16, batch_size=256, num_captions=5)
    return config
