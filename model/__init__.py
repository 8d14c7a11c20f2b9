"""NoteLLM-2: multimodal note representations. Knows torch and transformers only."""

from model.config import VARIANTS, ModelConfig
from model.encode import encode
from model.network import NoteLLM2, build_model
from model.prompts import NoteInput

__all__ = ["VARIANTS", "ModelConfig", "NoteInput", "NoteLLM2", "build_model", "encode"]
