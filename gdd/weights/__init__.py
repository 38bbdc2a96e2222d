"""Pretrained weights in diffusers' and transformers' formats, torch-free."""
