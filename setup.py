"""blip-jax: BLIP (Bootstrapping Language-Image Pre-training) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="blip-jax",
    version="0.1.0",
    description="BLIP in JAX/Flax: ViT + MED, ITC/ITM/LM pre-training, captioning, "
    "retrieval and VQA, data-parallel with jax.jit over a mesh.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["blip_jax", "blip_jax.*"]),
    package_data={"blip_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.7",
        "orbax-checkpoint>=0.12",
        "ml-collections>=1.0",
        "einops>=0.8",
        "numpy",
        "pillow",
        "transformers>=5",
        "tokenizers",
        "safetensors",
        "tensorflow-cpu",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds 4.9.10 imports it when building a dataset
        "tqdm",
        "absl-py",
        "tensorboardX",
    ],
    extras_require={
        # torch is installed separately (`pip install torch==2.13.0`, the CPU wheel):
        # naming it here would let pip pull a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-timeout", "scipy"],
    },
    entry_points={"console_scripts": ["blip-jax=blip_jax.cli:main"]},
)
