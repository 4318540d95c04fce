"""Build the bundled model from scratch: data, tokenizer, random init, a three-stage recipe, evaluation.

    python -m lfm2vl.train.bundled_recipe --output runs/bundled [--install]

The recipe (docs/bundled_model.md) runs entirely through the public trainer:
1. "vision": describe each training image ("red circle"): the image path must carry the answer, so
   the vision tower and projector learn colour and shape before any question can be guessed from
   its wording (trained naively, the model stalls at the question-only prior, ~65%);
2. "mid": joint mid-training as in the LFM2-VL announcement: a text-only stream (docstrings of the
   Python standard library: text any machine has offline) mixed with the image stream, the text share
   annealed linearly from 95% to 30%;
3. "sft": supervised fine-tuning on the easy-VQA training questions.
Only the easy-VQA *train* split is used; the test split is for `lfm2vl eval --task easyvqa` alone.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sysconfig
import time
from pathlib import Path

from ..config import Lfm2VlConfig, TextConfig, VisionConfig
from .config import Stage, TrainConfig
from .weight_init import init_checkpoint
from .tokenizer import build_tokenizer

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
ASSET = Path(__file__).resolve().parent.parent / "assets" / "bundled_model"
# 64x64 easy-VQA images -> 192x192 -> 12x12 patches -> 36 image tokens; no tiling for such small inputs.
# (At 16 tokens the vision tower learned colour but stayed near chance on shape for 250 steps.)
IMAGE_SETTINGS = {"min_image_tokens": 36, "max_image_tokens": 36, "do_image_splitting": False,
                  "use_thumbnail": False, "resample": 2}
DESCRIBE = "Describe the shape in the image."


def model_config(vocab_size: int, image_token_id: int) -> Lfm2VlConfig:
    """About 1.1M parameters: LFM2 text 128 wide x 4 layers (conv/attn/conv/attn), SigLIP2 96 wide x 2 layers."""
    return Lfm2VlConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, block_multiple_of=64,
                        layer_types=("conv", "full_attention", "conv", "full_attention"), max_position_embeddings=4096),
        vision=VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            num_patches=64),
        image_token_id=image_token_id, projector_hidden_size=256,
    )


def stdlib_docstrings(max_chars: int = 800_000) -> list[str]:
    """Module, class and function docstrings of the running Python's standard library (plain English)."""
    out, n = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    words = re.sub(r"\s+", " ", doc).strip().split(" ")
                    for k in range(0, len(words), 24):  # short records: about 40-60 tokens each
                        out.append(" ".join(words[k : k + 24]))
                        n += len(out[-1])
        if n > max_chars:
            break
    return out


def image_labels(questions, answers, image_ids) -> dict[int, str]:
    """'<colour> <shape>' per training image, read off its questions and answers."""
    colour, shape = {}, {}
    for q, a, i in zip(questions, answers, image_ids):
        words = re.findall(r"\w+", q)
        cs, ss = [w for w in words if w in COLORS], [w for w in words if w in SHAPES]
        if a in COLORS:
            colour[i] = a
            if ss:
                shape[i] = ss[0]
        if a in SHAPES:
            shape[i] = a
            if cs:
                colour[i] = cs[0]
        if a in ("yes", "no") and (a == "yes") != ("not" in words or "no" in words):  # the named thing is there
            if cs:
                colour[i] = cs[0]
            if ss:
                shape[i] = ss[0]
    return {i: f"{colour[i]} {shape[i]}" for i in colour if i in shape}


def _chat(image: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]}


def prepare(work: Path) -> tuple[dict[str, Path], list[str]]:
    """Write the JSONL files of the recipe; returns their paths and the tokenizer corpus."""
    import easy_vqa

    work.mkdir(parents=True, exist_ok=True)
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    labels = image_labels(questions, answers, image_ids)
    files = {name: work / f"{name}.jsonl" for name in ("describe", "vqa", "text", "heldout")}
    with open(files["describe"], "w") as f:
        for i, label in sorted(labels.items()):
            f.write(json.dumps(_chat(paths[i], DESCRIBE, label)) + "\n")
    with open(files["vqa"], "w") as f, open(files["heldout"], "w") as h:
        for k, (q, a, i) in enumerate(zip(questions, answers, image_ids)):
            f.write(json.dumps(_chat(paths[i], q, a)) + "\n")
            if k % 80 == 0:  # a loss-monitoring sample (from the train split; never the test split)
                h.write(json.dumps(_chat(paths[i], q, a)) + "\n")
    texts = stdlib_docstrings()
    with open(files["text"], "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    corpus = [*questions, *answers, *labels.values(), DESCRIBE, *texts]
    return files, corpus


def recipe(start: Path, files: dict[str, Path], output: Path, scale: float = 1.0) -> TrainConfig:
    """The three stages; `scale` shortens or lengthens every stage (tests use a tiny scale)."""
    def steps(n: int) -> int:
        return max(1, round(n * scale))

    return TrainConfig(
        output_dir=str(output), model=str(start), batch_size=128, seed=0, save_every=steps(200),
        eval_data=(str(files["heldout"]),), eval_every=steps(500), weight_decay=0.01,
        autocast="none", padding_side="right",
        stages=(
            Stage(name="vision", data=(str(files["describe"]),), steps=steps(500), lr=3e-3, warmup_steps=steps(30)),
            # the describe task stays in the image stream: an auxiliary colour/shape objective throughout
            Stage(name="mid", data=(str(files["vqa"]), str(files["describe"])), text_data=(str(files["text"]),),
                  text_share=(0.95, 0.30), steps=steps(300), lr=3e-3, warmup_steps=steps(20)),
            Stage(name="sft", data=(str(files["vqa"]), str(files["describe"])), steps=steps(1800), lr=2e-3,
                  warmup_steps=steps(50), min_lr_ratio=0.05),
        ),
    )


def build(output: Path, scale: float = 1.0, install: bool = False, evaluate: bool = True) -> dict:
    from . import run

    t0 = time.perf_counter()
    files, corpus = prepare(output / "data")
    tok = build_tokenizer(corpus, vocab_size=1024)
    cfg = model_config(tok.get_vocab_size(), tok.token_to_id("<image>"))
    start = init_checkpoint(output / "init", cfg, tok, IMAGE_SETTINGS, seed=0)
    result = run(recipe(start, files, output / "run", scale))
    summary = {"train_seconds": round(time.perf_counter() - t0, 1), "steps": result.steps,
               "final_loss": result.final_loss, "model": str(result.model_dir)}
    if evaluate:
        import lfm2vl
        from ..eval.harness import evaluate as run_eval

        summary["eval"] = run_eval(lfm2vl.load(result.model_dir), "easyvqa", batch_size=256)
    if install:
        if ASSET.exists():
            shutil.rmtree(ASSET)
        shutil.copytree(result.model_dir, ASSET)
        summary["installed"] = str(ASSET)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lfm2vl.train.bundled_recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/bundled", help="work folder (data, checkpoints, final model)")
    p.add_argument("--install", action="store_true", help=f"copy the trained model into {ASSET}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    p.add_argument("--no-eval", action="store_true", help="skip the easy-VQA test evaluation at the end")
    args = p.parse_args(argv)
    print(json.dumps(build(Path(args.output), args.scale, args.install, not args.no_eval)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
