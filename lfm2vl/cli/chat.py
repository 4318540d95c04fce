"""`lfm2vl chat`: an interactive conversation on the engine.

Replies go to stdout, notices and errors to stderr. A turn that fails (a bad image, an engine
error, Ctrl-C during the reply) leaves the conversation exactly as it was before it; images are
checked when attached. When the conversation outgrows the context, the oldest turns are dropped
(and the user told so). On a terminal, input has line editing and history (readline).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ..engine import EngineError, Request
from .generate import pick_budget, say_budget, user_message
from .options import UsageError, check_model_args, generation_options, load_model, one_line, read_image_file

COMMANDS = ("commands: /image PATH [PATH ...] attaches images to your next message, /reset starts over, /quit "
            "leaves (or Ctrl-D); Ctrl-C stops a reply; start a message with // to send a leading /")


def _notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fit_context(model: Any, conversation: list[dict], opts: dict) -> tuple[Request, list[dict], int, Any]:
    """The request for `conversation`, dropping its oldest turns until it fits the context.

    Returns (request, the conversation it was built from, turns dropped, the automatic image budget of
    that conversation or None). A system message stays.
    """
    limit, dropped = model.engine.max_len, 0
    while True:
        turn, budget = pick_budget(model, conversation, opts)
        request = model.request(conversation, **turn)
        need = len(request.ids) + request.params.max_new_tokens
        if need <= limit:
            return request, conversation, dropped, budget
        first = 1 if conversation[0]["role"] == "system" else 0
        nxt = next((i for i in range(first + 1, len(conversation)) if conversation[i]["role"] == "user"), None)
        if nxt is None:
            raise ValueError(
                f"this message needs {len(request.ids)} prompt tokens (images included) + up to "
                f"{request.params.max_new_tokens} new ones, more than the model's context of {limit}: shorten it, "
                "attach fewer or smaller images, or lower --max-image-tokens / --max-new-tokens")
        conversation = conversation[:first] + conversation[nxt:]
        dropped += 1


def _read_line(tty: bool) -> str | None:
    """The next input line (None at end of input)."""
    if tty:
        try:
            return input("> ")
        except EOFError:
            print()  # Ctrl-D: leave the shell prompt on a line of its own
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _attach(rest: str, pending: list[Any]) -> None:
    try:
        paths = shlex.split(rest)  # quoted paths and drag-and-drop backslash escapes
    except ValueError as e:
        _notice(f"error: /image {rest}: {e} (close the quote)")
        return
    if not paths:
        _notice("usage: /image PATH [PATH ...] attaches images to your next message")
        return
    for path in paths:
        try:
            image = read_image_file(path, "/image")
        except UsageError as e:
            _notice(f"error: {e}")
            continue
        pending.append(image)
        _notice(f"(attached {path}: {image.shape[2]} x {image.shape[1]}; it goes with your next message)")


def cmd_chat(args: argparse.Namespace) -> int:
    opts = generation_options(args)  # checked before the weights load
    check_model_args(args)
    model = load_model(args)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (input() gains line editing and history)
        except ImportError:
            pass
    start: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    history, pending = list(start), []
    _notice(f"lfm2vl chat ({model.source}); {COMMANDS}")
    while True:
        try:
            line = _read_line(tty)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history, pending = list(start), []
                _notice("(conversation cleared)")
            elif command == "/image":
                _attach(rest, pending)
            else:
                _notice(f"unknown command {command}; {COMMANDS}")
            continue
        message = user_message(line.removeprefix("/"), pending)
        pending = []  # they belong to this turn, whatever becomes of it
        try:
            request, kept, dropped, budget = fit_context(model, [*history, message], opts)
            if budget is not None and request.images:  # a text-only conversation has no image budget to report
                say_budget(budget)
        except (ValueError, OSError) as e:
            _notice(f"error: {one_line(e)} (the conversation is unchanged)")
            continue
        if dropped:
            _notice(f"(the conversation outgrew the context of {model.engine.max_len} tokens: the oldest {dropped} "
                    "turn(s) were dropped; /reset starts over)")
        handle = model.engine.submit(request)
        reply = ""
        try:
            for event in handle:
                if event.finish_reason == "error":
                    raise EngineError(event.error)
                reply += event.text
                print(event.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            handle.cancel()
            print()
            _notice("(stopped; this turn is not kept)")
            continue
        except EngineError as e:
            print()
            _notice(f"error: {one_line(e)} (the conversation is unchanged)")
            continue
        history = [*kept, {"role": "assistant", "content": reply}]
