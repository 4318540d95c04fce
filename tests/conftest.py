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


@pytest.fixture(scope="module")
def one_thread():
    """Preprocessing is elementwise and bandwidth-bound: one thread gives the same bits, and on a
    busy 2-core machine avoids OpenMP threads waiting on each other (10x slower ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def procs(processor_ckpt):
    """(ours, reference) processors of the same checkpoint folder."""
    import reference
    from lfm2vl.processing.processor import Processor

    return Processor.from_pretrained(processor_ckpt), reference.load_reference_processor(processor_ckpt)


@pytest.fixture(scope="session")
def tiny_train_ckpt(tmp_path_factory):
    from test_train_utils import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def color_data(tmp_path_factory):
    from test_train_utils import make_color_data

    return make_color_data(tmp_path_factory.mktemp("data"))
