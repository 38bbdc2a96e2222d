"""The denoising network: a class- and w-conditional U-Net."""

from gdd.models.unet import UNet, UNetConfig

__all__ = ['UNet', 'UNetConfig']
