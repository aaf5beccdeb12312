"""megatron-distill: knowledge distillation of LLMs on Megatron-Core (TP x PP, fused vocab-parallel loss)."""

from setuptools import find_packages, setup

setup(
    name="megatron-distill",
    version="0.1.0",
    description="Knowledge distillation for large language models on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_distill", "megatron_distill.*"]),
    # CUDA source compiled at run time with NVRTC (losses/kernels/cluster_single_pass.py)
    package_data={"megatron_distill.losses.kernels": ["*.cu"]},
    # torch is a lower bound only: an installed torch (e.g. a CPU build) satisfies it, so pip
    # never replaces it with a CUDA build.
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "datasets>=2.19",
        "triton>=3.0",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy",
        "packaging>=24.2",
    ],
    extras_require={
        # trl: benchmarks/trl_gkd_baseline.py runs its GKDTrainer (trl.experimental, hence the pin);
        # it adds only accelerate and psutil and keeps the installed torch.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "ray>=2.9", "trl~=1.16.0"],
        # Hugging Face tokenizers / checkpoints (local files only; no hub access needed).
        "te": ["transformer-engine[pytorch]>=2.9"],
        "sglang": ["sglang"],
        "ray": ["ray>=2.9"],
    },
)
