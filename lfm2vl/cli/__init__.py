"""`lfm2vl` command line: generate (one question), chat (an interactive session), eval (a task score),
serve (the HTTP server; lfm2vl/server/command.py), train (fine-tuning; lfm2vl/train/command.py),
bench (speed and memory; lfm2vl/bench/command.py).

Every user error, in every subcommand, is one line on stderr starting with `error:`, exit status 2,
checked before any weights are read when the problem is in the arguments. A traceback appears only
with --debug (or LFM2VL_DEBUG=1); an unexpected failure otherwise says so in one line, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import UsageError, add_generation_args, add_model_args, check_model_args, load_model, one_line

__all__ = ["UsageError", "build_parser", "main"]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (unknown flag, missing value, ...) as one `error:` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    import lfm2vl

    return f"lfm2vl {lfm2vl.__version__}"


def build_parser() -> argparse.ArgumentParser:
    from ..bench.command import add_parser as add_bench_parser
    from ..server.command import add_parser as add_serve_parser
    from ..train.command import add_parser as add_train_parser
    from .chat import cmd_chat
    from .evaluate import add_parser as add_eval_parser
    from .generate import cmd_generate
    from .quantize import add_parser as add_quantize_parser

    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (also: LFM2VL_DEBUG=1)")
    parser = Parser(prog="lfm2vl", description="LFM2-VL vision-language models: answer questions "
                                     "about images, chat, serve an OpenAI-compatible API, evaluate, fine-tune.",
                                     allow_abbrev=False, parents=[common])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def subparser(name: str, **kw):
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kw)

    g = subparser("generate", help="answer one prompt, optionally about images",
                  description="Answer one prompt (optionally about images) and print the reply.")
    add_model_args(g)
    g.add_argument("--image", action="append", metavar="PATH",
                   help="image file (repeatable; in order, before the prompt)")
    g.add_argument("--prompt", required=True, help="the question; - reads it from standard input")
    g.add_argument("--system", default=None, help="a system prompt (default: none)")
    out = g.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object: text, finish reason, token counts and timing")
    add_generation_args(g)
    g.set_defaults(func=cmd_generate)
    c = subparser("chat", help="interactive chat; /image PATH attaches an image",
                  description="An interactive chat. Commands: /image PATH [PATH ...] attaches images to your next "
                  "message, /reset starts over, /quit (or Ctrl-D) leaves. Ctrl-C stops a reply.")
    add_model_args(c)
    c.add_argument("--system", default=None, help="a system prompt (default: none)")
    add_generation_args(c)
    c.set_defaults(func=cmd_chat)
    add_eval_parser(subparser)
    add_serve_parser(subparser, add_model_args, check_model_args, load_model)
    add_train_parser(subparser)
    add_bench_parser(subparser, add_model_args, check_model_args)
    add_quantize_parser(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..engine import EngineError

    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("LFM2VL_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # leave the shell prompt on a line of its own
        return 130
    except (ValueError, TypeError, OSError, EngineError) as e:  # the message names the problem and the remedy
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (a bug: one line, the traceback on request)
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {one_line(e)}); rerun with --debug for the traceback "
              "and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
