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


@pytest.fixture(scope="session")
def processor_ckpt(tmp_path_factory):
    """A folder with only the tokenizer and transformers' own Lfm2VlProcessor files (no model weights)."""
    import reference

    tf = reference.transformers()
    from lfm2vl.train.tokenizer import CHAT_TEMPLATE, save_tokenizer_files

    folder = tmp_path_factory.mktemp("processor_ckpt")
    save_tokenizer_files(reference.tokenizer(), folder)
    fast_tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>", padding_side="left",
    )
    processor = tf.Lfm2VlProcessor(
        image_processor=tf.Lfm2VlImageProcessor(), tokenizer=fast_tok, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(folder)
    return folder
