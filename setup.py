from setuptools import find_packages, setup

setup(
    name="torchrec_prune",
    version="0.1.0",
    description="Prune and regrow the embedding and MLP layers of TorchRec models during incremental training.",
    packages=find_packages(include=["torchrec_prune", "torchrec_prune.*"]),
    python_requires=">=3.10",
    # torch, fbgemm-gpu-cpu and torchrec are pinned and installed by the Makefile: torchrec names the
    # CUDA fbgemm-gpu as a dependency, so it is installed with --no-deps (see README).
    install_requires=[
        "numpy",
        "tensordict",
        "torchmetrics==1.0.3",
        "tqdm",
        "pyre-extensions",
        "iopath",
        "matplotlib",
    ],
    extras_require={"ray": ["ray[default]==2.60.0"], "dev": ["pytest", "ruff"]},
    entry_points={"console_scripts": ["torchrec-prune=torchrec_prune.cli:main"]},
)
