"""Resolve a local folder or a Hugging Face Hub id to a checkpoint folder on disk.

Hub ids go through huggingface_hub, so the user's cache, HF_HOME / HF_HUB_CACHE and
HF_HUB_OFFLINE are honoured exactly as transformers honours them. Only the files LFM2-VL needs
are fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Files that travel with the weights (tokenizer, chat template, processor settings, generation defaults).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
)
CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES]


class CheckpointNotFound(FileNotFoundError):
    pass


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(name: str) -> bool:
    return not _HUB_ID.match(name)


def resolve(name: str | os.PathLike, revision: str | None = None) -> Path:
    """Local folder as is; `org/name` through huggingface_hub (download or cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointNotFound(f"{path} has no config.json: not a model checkpoint folder")
        return path
    name = str(name)
    if path.exists() or _looks_like_path(name):
        raise CheckpointNotFound(f"no checkpoint folder at {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        raise CheckpointNotFound(
            f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE=1 forbids downloading it" if offline else " and the Hub could not be reached")
            + f". Fix: on a machine with network run `hf download {name}`"
            + (" (or unset HF_HUB_OFFLINE)" if offline else "") + ", "
            "or pass the path of a local checkpoint folder."
        ) from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise CheckpointNotFound(f"{name!r} is neither a local folder nor a Hub model id ({e})") from e
