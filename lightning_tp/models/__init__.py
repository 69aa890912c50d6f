"""Model definitions: a native Llama with Hugging Face module names, and its named presets."""

from lightning_tp.models.config import PRESETS, LlamaConfig, get_config, list_presets
from lightning_tp.models.llama import Llama

__all__ = ["PRESETS", "Llama", "LlamaConfig", "get_config", "list_presets"]
