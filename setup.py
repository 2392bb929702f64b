from setuptools import find_packages, setup

setup(
    name="qft_ds",
    version="0.1.0",
    description="Quantized Full-parameter Tuning (int8 weights, gradients and Lion momentum) for DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["qft_ds", "qft_ds.*"]) + ["qft_ds.ops"],
    package_dir={"qft_ds.ops": "ops"},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.48",
        "accelerate",
        "datasets",
        "safetensors",
        "gguf",
        "tqdm",
        "matplotlib",  # qft_ds plot
    ],
    extras_require={"test": ["pytest", "triton; platform_system == 'Linux'"], "triton": ["triton"]},
    entry_points={"console_scripts": ["qft_ds=qft_ds.cli:main"]},
)
