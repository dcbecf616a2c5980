"""Which architectures mlxflash runs, and their model classes (mlx-lm's, or the project's own)."""

from __future__ import annotations

from mlx_lm.utils import _get_classes

from . import opt

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILY = ("qwen3_moe", "qwen2_moe", "mixtral")  # routed experts are mlx-lm's SwitchGLU (format/moe.py)
SUPPORTED = (*LLAMA_FAMILY, "opt", *MOE_FAMILY)


def model_classes(config: dict):
    """(Model, ModelArgs) for a Hugging Face config: mlx-lm's classes; OPT is ours (mlx-lm has none)."""
    if config.get("model_type") == "opt":
        return opt.Model, opt.ModelArgs
    return _get_classes(config)
