"""Chat formatting: a dialogue -> (prompt ids, response ids) pairs, one per assistant reply.

A turn is its role header in plain text (`ROLE_HEADERS`) encoded, the content encoded, then the
end-of-turn id. SFT JSONL lines hold {"messages": [{"role", "content"}, ...]} or {"prompt",
"response"[, "system"]}; `dialogue_messages` reads either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llada_jax.data.inputs import BadRecord
from llada_jax.data.tokenizer import Tokenizer

ROLE_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}


def format_turns(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]
) -> list[tuple[list[int], list[int]]]:
    """A dialogue -> one (prompt_ids, response_ids) pair per assistant reply.

    Each message is {"role": "system" | "user" | "assistant", "content": str}. A turn is the
    role header (plain text, `ROLE_HEADERS`: "System:\\n", "User:\\n", "Assistant:\\n") encoded,
    then the content encoded, then the end-of-turn id. The prompt of the k-th assistant reply is
    every turn before it (a leading system message thus starts every prompt) followed by the
    "Assistant:\\n" header; its response is the reply's content ids followed by the eot id. No
    EOS or padding is added. Messages after the last assistant reply are ignored.

    Raises BadRecord when a message is not an object, lacks role/content, has an unknown role or
    non-string / empty content, or when there is no assistant reply.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecord("'messages' is not a non-empty list")
    header_ids = {role: tokenizer.encode(h) for role, h in ROLE_HEADERS.items()}
    history: list[int] = []
    pairs: list[tuple[list[int], list[int]]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is not an object")
        if "role" not in m or "content" not in m:
            raise BadRecord(f"message {i}: missing field 'role' or 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLE_HEADERS:
            raise BadRecord(f"message {i}: unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"message {i}: 'content' is not a string")
        if not content.strip():
            raise BadRecord(f"message {i}: empty text")
        content_ids = tokenizer.encode(content) + [tokenizer.eot_id]
        if role == "assistant":
            pairs.append((history + header_ids["assistant"], content_ids))
        history = history + header_ids[role] + content_ids
    if not pairs:
        raise BadRecord("dialogue has no assistant reply")
    return pairs


def dialogue_messages(obj: Any) -> list[dict[str, Any]]:
    """An SFT JSONL object -> its messages ({"messages": [...]} or {"prompt", "response"})."""
    if not isinstance(obj, dict):
        raise BadRecord("line is not a JSON object")
    if "messages" in obj:
        return obj["messages"]
    if "prompt" in obj and "response" in obj:
        messages = [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
        if obj.get("system") is not None:
            messages.insert(0, {"role": "system", "content": obj["system"]})
        return messages
    raise BadRecord("missing field 'messages' or 'prompt'/'response'")


def chat_prompt(tokenizer: Tokenizer, user_text: str) -> list[int]:
    """The ids of a one-turn chat prompt asking for the assistant's reply.

    With a Hugging Face tokenizer whose tokenizer_config.json has a `chat_template`, that Jinja
    template is rendered as Hugging Face's `apply_chat_template(messages,
    add_generation_prompt=True, tokenize=False)` does (trimmed blocks, its bos/eos tokens) and
    the text encoded with no special tokens added (the template writes its own). Otherwise the
    prompt is this project's SFT format: the user turn, then the assistant header.
    """
    template = getattr(tokenizer, "chat_template", None)
    messages = [{"role": "user", "content": user_text}]
    if not template:
        ids = tokenizer.encode(ROLE_HEADERS["user"]) + tokenizer.encode(user_text)
        return ids + [tokenizer.eot_id] + tokenizer.encode(ROLE_HEADERS["assistant"])
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        """The templates' `raise_exception(message)`, as in Hugging Face: raises ValueError."""
        raise ValueError(f"the tokenizer's chat template refused the prompt: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(
        messages=messages, add_generation_prompt=True, **tokenizer.template_tokens
    )
    return tokenizer.encode(text)
