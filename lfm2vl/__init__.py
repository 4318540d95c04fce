"""lfm2vl: Liquid AI's LFM2-VL vision-language models in plain PyTorch."""

__version__ = "0.1.0"
