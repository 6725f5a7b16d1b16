"""kiln.model: nn.Modules only. The MMDiT denoiser, its presets and FLOP count, text encoders."""

from kiln.model.exported import load_exported
from kiln.model.mmdit import MMDiT, MMDiTConfig
from kiln.model.presets import PRESETS, count_params, forward_flops, preset
from kiln.model.text_encoder import OpenCLIPTextEncoder, TextBatch, build_text_encoder

__all__ = [
    "MMDiT", "MMDiTConfig", "OpenCLIPTextEncoder", "PRESETS", "TextBatch", "build_text_encoder",
    "count_params", "forward_flops", "load_exported", "preset",
]
