"""Prompts for causal LMs: how a classification row is asked, and how a prompt becomes token ids.

A tokenizer with a chat template (an instruction-tuned model such as ``model=smollm2``) gets the prompt as a user
message, ``apply_chat_template(..., add_generation_prompt=True)``, so the answer that follows (the label word, or
the response of instruction data) is the assistant's turn, as the model was tuned. A tokenizer without one
(``tiny_llama``'s byte tokenizer, base models) gets the plain prompt, as before.
"""

from __future__ import annotations

#: stands for the user message while the template is rendered once, to split it into (prefix, suffix)
_SLOT = "\u2063FEDLORA-PROMPT\u2063"


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def classification_prompt(tok, text: str, label_words) -> str:
    """The question for one classification row. Plain: ``Review: ...\\nSentiment: `` (the label word follows). Chat:
    the review, then the question naming the label words (after the review, so truncation keeps it)."""
    if not has_chat_template(tok):
        return f"Review: {text}\nSentiment: "
    words = [str(w) for w in label_words]
    choices = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    return f"Review: {text}\n\nIs the sentiment of this review {choices}? Answer with one word."


def chat_text(tok, prompt: str) -> str:
    """``prompt`` as a user message with the assistant's turn opened (the tokenizer's chat template)."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def _wrapper(tok) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the user message (the template rendered once)."""
    key = getattr(tok, "name_or_path", "") + str(hash(tok.chat_template))
    cached = _WRAPPERS.get(key)
    if cached is None:
        before, after = chat_text(tok, _SLOT).split(_SLOT)
        cached = _WRAPPERS[key] = (tok(before, add_special_tokens=False)["input_ids"],
                                   tok(after, add_special_tokens=False)["input_ids"])
    return cached


_WRAPPERS: dict[str, tuple[list[int], list[int]]] = {}


def encode_prompt(tok, prompt: str, budget: int) -> list[int]:
    """Token ids of ``prompt`` in at most ``max(budget, 1)`` tokens, cut at the start (the end sits next to the
    answer). With a chat template the template is kept whole and the user message is cut instead."""
    budget = max(int(budget), 1)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not has_chat_template(tok):
        return ids[-budget:]
    before, after = _wrapper(tok)
    room = budget - len(before) - len(after)
    if room < 1:
        return (before + ids + after)[-budget:]
    return before + ids[-room:] + after


def chat_ids(tok, prompt: str) -> list[int]:
    """Token ids to generate from: the chat template's (user message, assistant turn opened) where there is one,
    else the plain prompt with the tokenizer's special tokens (e.g. a BOS)."""
    if has_chat_template(tok):
        return tok(chat_text(tok, prompt), add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]
