"""The latent stage: a diffusers ``AutoencoderKL`` (SD 1/2, SDXL, SD3, Flux VAEs) from local files.

``LatentCodec.load(path)`` reads a folder written by ``AutoencoderKL.save_pretrained`` (config.json
+ weights); its GroupNorms are swapped for ``kiln.kernels.GroupNorm`` (``patch_group_norm``), so
on CUDA they run kiln's kernels. Frozen, eval mode.
encode: images in [-1, 1] (B, 3, H, W) -> latents (B, C, H/f, W/f), ``(mean - shift) * scale``
with the VAE's own ``scaling_factor`` / ``shift_factor`` (SD3 and Flux shift, SD 1/SDXL do not).
The posterior mean, not a sample: the same image always gives the same latent, so a resumed run
and a precomputed-latents run see exactly what the online run saw.
decode: the inverse, back to [-1, 1].
"""

from __future__ import annotations

import os

import torch

from kiln.engine.errors import KilnError


class LatentCodec(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        from kiln.kernels import patch_group_norm

        self.vae = vae.requires_grad_(False).eval()
        self.groupnorms = patch_group_norm(self.vae)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # spatial downsampling
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def load(cls, path: str, device: torch.device | None = None) -> LatentCodec:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise KilnError(f"data.vae: {path!r} is not a diffusers AutoencoderKL folder (config.json + weights)")
        from diffusers import AutoencoderKL

        codec = cls(AutoencoderKL.from_pretrained(path, local_files_only=True))
        return codec.to(device) if device is not None else codec

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # images (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)
        mean = self.vae.encode(images.float()).latent_dist.mean
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]
        return self.vae.decode(latents.float() / self.scale + self.shift).sample
