"""Prompts for one instruction or a whole conversation, history trimmed to the context, and the chat loop.

A prompt is built with one of the templates of `zhjax.data.templates` (the only place that knows their
wording): `alpaca`, `alpaca2`, `chat` (the tokenizer's own chat template) or `none` (the text as given).

A conversation is assembled from token ids, turn by turn, as the seed's v2 demo assembles its text: each
finished turn is its prompt, a space (alpaca2) and the response, closed by EOS; the next turn opens with the
tokenizer's BOS (where it adds one) and, for alpaca2, the short `[INST] ... [/INST]` form, the system prompt
staying in the first turn. Building ids rather than a string with `</s><s>` in it keeps special tokens special
whatever the tokenizer does with that text. When the prompt plus the tokens to generate would not fit the
context, the oldest turn is dropped, and again, until it fits (the system prompt moves to the new first turn);
a single turn that is still too long keeps its last tokens. Each reply re-reads the whole conversation (no cache
is kept between turns), as the seed's demo does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from zhjax.data.templates import CHAT, TEMPLATE_NAMES, render_prompt

NONE = "none"
CHOICES = (*TEMPLATE_NAMES, NONE)


def _check_template(template: str) -> None:
    if template not in CHOICES:
        raise ValueError(f"unknown template {template!r}; choose one of {CHOICES}")


def _chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def build_prompt(template: str, instruction: str, tokenizer, *, system_prompt: str | None = None) -> list[int]:
    """Token ids of a single-turn prompt: `instruction` wrapped in `template` (BOS added where the tokenizer
    adds one; the `chat` template places its own special tokens)."""
    return Conversation(template, system_prompt).prompt_ids(tokenizer, instruction)[0]


@dataclass
class Conversation:
    """A multi-turn conversation: finished `(user, assistant)` turns and the template that frames them."""

    template: str
    system_prompt: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_template(self.template)

    def reset(self) -> None:
        """Forget every turn."""
        self.turns.clear()

    def _turn_text(self, index: int, user: str, response: str | None) -> str:
        if self.template == NONE:
            text = user
        else:
            text = render_prompt(self.template, user, system_prompt=self.system_prompt, first_turn=index == 0)
        if response is None:
            return text
        return text + (" " + response if self.template == "alpaca2" else response)

    def _ids(self, tokenizer, turns: list[tuple[str, str]], user: str) -> list[int]:
        if self.template == CHAT:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for u, a in turns:
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": user})
            return _chat_template_ids(tokenizer, messages, add_generation_prompt=True)
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        ids: list[int] = []
        for i, (u, a) in enumerate(turns):
            ids += tokenizer(self._turn_text(i, u, a), add_special_tokens=True)["input_ids"] + eos
        return ids + tokenizer(self._turn_text(len(turns), user, None), add_special_tokens=True)["input_ids"]

    def prompt_ids(self, tokenizer, user: str, max_prompt_tokens: int | None = None) -> tuple[list[int], int]:
        """Ids of the prompt for the next reply to `user`, and how many old turns were dropped to fit.

        Oldest turns go first (they are removed from `self.turns`); if the new turn alone is longer than
        `max_prompt_tokens`, its last `max_prompt_tokens` ids are kept.
        """
        dropped = 0
        ids = self._ids(tokenizer, self.turns, user)
        while max_prompt_tokens is not None and len(ids) > max_prompt_tokens and self.turns:
            self.turns.pop(0)
            dropped += 1
            ids = self._ids(tokenizer, self.turns, user)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
        return ids, dropped


def run_chat(
    reply: Callable[[list[int], Callable[[int, str], None]], str],
    tokenizer,
    conversation: Conversation,
    *,
    max_prompt_tokens: int,
    read_line: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """The interactive loop: read a line, answer it (streamed), remember the turn. `/reset` forgets the
    history, `/exit` (or end of input) leaves. `reply(prompt_ids, stream)` generates the answer's text.

    Returns the number of turns answered.
    """
    answered = 0
    err.write("zhjax chat: /reset clears the history, /exit leaves\n")
    while True:
        try:
            line = read_line("User: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return answered
        command = line.strip()
        if command == "/exit":
            return answered
        if command == "/reset":
            conversation.reset()
            err.write("(history cleared)\n")
            continue
        if not command:
            continue
        ids, dropped = conversation.prompt_ids(tokenizer, line, max_prompt_tokens)
        if dropped:
            err.write(f"(the conversation was too long for the context: dropped the {dropped} oldest turn(s))\n")
        out.write("Assistant: ")
        out.flush()

        def stream(_row: int, text: str) -> None:
            out.write(text)
            out.flush()

        answer = reply(ids, stream)
        out.write("\n")
        out.flush()
        conversation.turns.append((line, answer))
        answered += 1
