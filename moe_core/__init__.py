"""moe_core: a small, tested PyTorch package for studying Mixture-of-Experts routing."""
from .config import ROUTERS, ModelConfig, MoEConfig
from .model import ModelOutput, TinyMoEModel
from .moe import MoEFeedForward, MoEStats

__all__ = ["ROUTERS", "MoEConfig", "ModelConfig", "MoEFeedForward", "MoEStats", "TinyMoEModel", "ModelOutput"]
