"""Prompt templates for instruction tuning: the only place in zhjax that knows their wording.

``TEMPLATES[name]`` holds the template strings, verbatim from the seed:

- ``alpaca``: Chinese-Alpaca's (v1) training prompt, one ``{instruction}`` slot.
- ``alpaca2``: Chinese-Alpaca-2's LLaMA-2 chat prompt, with ``{system_prompt}`` (default
  `DEFAULT_SYSTEM_PROMPT`) and ``{instruction}`` slots.

A third name, ``chat``, uses the tokenizer's own chat template (``tokenizer.apply_chat_template``); its
wording lives in the tokenizer, so it has no entry here. In both seed templates a non-empty ``input`` is
appended to the instruction after a newline.

The prompt ends where the response starts: the response (and then EOS, as an id) follows it directly.
Multi-turn conversations with ``alpaca2`` continue as LLaMA-2 chat does: each later user turn is
``"[INST] {instruction} [/INST]"`` after the previous response's EOS and a BOS.
"""

from __future__ import annotations

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response: "
)
ALPACA2 = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]"
ALPACA2_NEXT_TURN = "[INST] {instruction} [/INST]"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"

TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "alpaca2": ALPACA2}
CHAT = "chat"
TEMPLATE_NAMES = (*TEMPLATES, CHAT)


def join_instruction(instruction: str, input: str | None = None) -> str:
    """The seed's rule: ``instruction + "\\n" + input`` when input is non-empty, else the instruction alone."""
    return f"{instruction}\n{input}" if input else instruction


def render_prompt(template: str, instruction: str, *, system_prompt: str | None = None, first_turn: bool = True) -> str:
    """The prompt text of ``template`` ("alpaca" or "alpaca2") around an already joined ``instruction``.

    ``first_turn=False`` gives the prompt of a later turn of a conversation (``alpaca2``'s short form; ``alpaca``
    repeats its whole prompt, as the seed had no multi-turn format for it).
    """
    if template == "alpaca":
        return ALPACA.format(instruction=instruction)
    if template == "alpaca2":
        if not first_turn:
            return ALPACA2_NEXT_TURN.format(instruction=instruction)
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        return ALPACA2.format(system_prompt=system, instruction=instruction)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATE_NAMES}")
