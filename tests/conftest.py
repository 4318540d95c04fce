import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random LFM2-VL saved by transformers' own save_pretrained; returns (folder, reference model)."""
    import reference

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    model = reference.make_reference_checkpoint(folder)
    return folder, model
