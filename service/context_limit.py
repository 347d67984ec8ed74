"""The one rule for what fits a request's context: its prompt, then its prompt and max_new_tokens.

Three places apply it: the frontend's cheap check (from a lower bound on the prompt's tokens, before
tokenizing), the sampling options (from the exact prompt), and the engine (which refuses anything
that slipped past). They word and blame the same way."""

from __future__ import annotations


def context_problem(
    prompt_tokens: int, max_new_tokens: int, context_len: int, *, at_least: bool = False, detail: str = ""
) -> tuple[str, str] | None:
    """(request field to blame, message) when the request cannot fit `context_len` tokens, else None.

    `at_least`: `prompt_tokens` is a lower bound (the prompt was not tokenized yet); `detail` says
    where the number comes from."""
    prompt = f"the prompt is {'at least ' if at_least else ''}{prompt_tokens} tokens{f' ({detail})' if detail else ''}"
    if prompt_tokens >= context_len:
        return (
            "messages",
            f"{prompt}; the context limit is {context_len} tokens (--max-context-tokens), with room for at "
            f"least one new token",
        )
    total = prompt_tokens + max_new_tokens
    if total > context_len:
        return (
            "sampling.max_new_tokens",
            f"{prompt} + max_new_tokens ({max_new_tokens}) = {total}, more than the context limit of "
            f"{context_len} tokens",
        )
    return None
