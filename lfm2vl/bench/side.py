"""One side of a benchmark in a process of its own (so its peak memory is its own):

    python -m lfm2vl.bench.side '{"system": "lfm2vl" | "transformers", "model": DIR, ...}'

prints the measurements as one JSON line; an error as one JSON line with "error".
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    try:
        if spec["system"] == "transformers":
            from .reference import run  # only ever here: the package never imports it
        else:
            from .ours import run
        result = run(spec)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which prints one error line)
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps({**result, "system": spec["system"], "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
