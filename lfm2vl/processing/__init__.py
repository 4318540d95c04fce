"""Preprocessing for LFM2-VL: settings, tiling plan, image loading, chat rendering, the Processor.

Data flow: settings.py (knobs) -> tiling.py (pure plan) -> image.py (pixels -> crops) -> patches.py
(crops -> encoder input); chat.py (messages -> prompt) and tokens.py (tokenizer) -> processor.py.
"""

from .image import SAFE_FORMATS, ImageError, ImageTooLarge, load_image, load_image_file
from .processor import Processor
from .settings import ImageSettings
from .tiling import TilePlan, plan_tiles

__all__ = ["SAFE_FORMATS", "ImageError", "ImageTooLarge", "ImageSettings", "Processor", "TilePlan", "load_image", "load_image_file", "plan_tiles"]
