"""Config validation for pre-training: every problem is one line, raised before anything compiles."""
from __future__ import annotations

import jax


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what to do."""


REQUIRED = ("total_steps", "batch_size", "seed", "log_every_steps", "checkpoint_every_steps",
            "eval_every_steps", "init_from", "model", "input", "itc", "itm", "lm", "optim", "sharding")


def validate_config(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Raise ConfigError (one line) for the first problem found in a pre-training config."""
    for name in REQUIRED:
        if name not in config:
            raise ConfigError(f"config.{name} is missing: start from configs/pretrain.py")
    num_devices = jax.device_count() if num_devices is None else num_devices
    batch, queue = int(config.batch_size), int(config.itc.queue_size)
    if int(config.total_steps) <= 0:
        raise ConfigError(f"total_steps {config.total_steps} must be > 0")
    if batch <= 1:
        raise ConfigError(f"batch_size {batch} must be >= 2 (in-batch negatives need two samples)")
    for field in ("log_every_steps",):
        if int(config[field]) <= 0:
            raise ConfigError(f"{field} {config[field]} must be > 0")
    for field in ("checkpoint_every_steps", "eval_every_steps"):
        if int(config[field]) < 0:
            raise ConfigError(f"{field} {config[field]} must be >= 0 (0 disables)")
    if queue <= 0 or queue % batch:
        raise ConfigError(f"queue_size {queue} is not divisible by the global batch {batch}: set "
                          f"config.itc.queue_size to a multiple of {batch}")
    fsdp = int(config.sharding.fsdp)
    if fsdp < 1 or num_devices % fsdp:
        raise ConfigError(f"sharding.fsdp={fsdp} does not divide the {num_devices} devices: set it to a "
                          f"divisor of {num_devices}")
    if batch % num_devices:
        raise ConfigError(f"batch_size {batch} is not divisible by the {num_devices} devices: use a "
                          f"multiple of {num_devices}")
    if batch % jax.process_count():
        raise ConfigError(f"batch_size {batch} is not divisible by the {jax.process_count()} processes")
    local = batch // num_devices
    for field in ("itc", "itm"):
        negatives = config[field].negatives
        if negatives not in ("global", "local"):
            raise ConfigError(f"{field}.negatives={negatives!r} must be 'global' or 'local'")
        if negatives == "local" and local < 2:
            raise ConfigError(f"{field}.negatives='local' needs >= 2 samples per device, got {local}: "
                              "raise batch_size or use 'global'")
    if config.nan_policy not in ("skip", "stop"):
        raise ConfigError(f"nan_policy={config.nan_policy!r} must be 'skip' or 'stop'")
    if not 0.0 <= float(config.itc.alpha) <= 1.0:
        raise ConfigError(f"itc.alpha {config.itc.alpha} must be in [0, 1]")
    if not 0.0 <= float(config.itc.momentum) <= 1.0:
        raise ConfigError(f"itc.momentum {config.itc.momentum} must be in [0, 1]")
    vision = config.model.vision
    if int(vision.image_size) % int(vision.patch_size):
        raise ConfigError(f"model.vision.image_size {vision.image_size} is not a multiple of patch_size "
                          f"{vision.patch_size}: pick an image size divisible by the patch size")
    if int(config.input.image_size) != int(vision.image_size):
        raise ConfigError(f"input.image_size {config.input.image_size} != model.vision.image_size "
                          f"{vision.image_size}: set both to the same value")
    if int(config.input.max_length) > int(config.model.text.max_position_embeddings):
        raise ConfigError(f"input.max_length {config.input.max_length} exceeds model.text."
                          f"max_position_embeddings {config.model.text.max_position_embeddings}")
    accum = int(config.optim.get("grad_accum_steps", 1) or 1)
    if accum < 1:
        raise ConfigError(f"optim.grad_accum_steps {accum} must be >= 1")
    if config.optim.schedule in ("blip_pretrain", "cosine_per_epoch") and int(config.optim.steps_per_epoch) <= 0:
        raise ConfigError(f"optim.schedule={config.optim.schedule!r} needs optim.steps_per_epoch > 0")
    if config.optim.schedule not in ("warmup_cosine", "blip_pretrain", "cosine_per_epoch", "constant"):
        raise ConfigError(f"optim.schedule={config.optim.schedule!r} is unknown: use warmup_cosine, "
                          "blip_pretrain, cosine_per_epoch or constant")
    if config.init_from and (config.init_vision_from or config.init_text_from):
        raise ConfigError("set either init_from or init_vision_from/init_text_from, not both")
    if not config.input.get("name"):
        raise ConfigError("input.name is empty: name a dataset (e.g. synthetic_shapes)")
    if check_data:
        from blip_jax.data import datasets
        try:
            datasets.load_builder(config.input.name, config.input.data_dir)
        except ValueError as error:
            raise ConfigError(str(error).splitlines()[0]) from None
