"""Flax NNX model definitions, configs and checkpoint loading."""

from models.checkpoint import (CheckpointError, convert_to_orbax, load_config,
                               load_from_tensors, load_generation_config, load_model,
                               save_safetensors)
from models.config import ModelConfig, RopeConfig
from models.transformer import Transformer

__all__ = ["CheckpointError", "ModelConfig", "RopeConfig", "Transformer", "convert_to_orbax",
           "load_config", "load_from_tensors", "load_generation_config", "load_model",
           "save_safetensors"]
