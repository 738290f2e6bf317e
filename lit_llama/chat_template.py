"""A checkpoint's own chat template: the Jinja program in its tokenizer_config.json (or
chat_template.jinja) that turns a conversation into the text the model was trained on.

    render_chat_template(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                         special_tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})

Rendered as transformers' `apply_chat_template(..., tokenize=False)` renders it (written from
transformers.utils.chat_template_utils, v5): the template runs in jinja2's
ImmutableSandboxedEnvironment (templates come from the Hub and are untrusted code; the sandbox
refuses attribute access to Python internals and any mutation of the inputs) with trim_blocks and
lstrip_blocks and the loopcontrols extension; `raise_exception(message)`, `strftime_now(format)`
and a `tojson` filter that does not escape HTML are defined; the template sees `messages`,
`add_generation_prompt` and the tokenizer's special tokens as strings (bos_token, eos_token,
unk_token, pad_token). Message keys whose value is None are dropped first, as transformers does.
Tools, documents, `{% generation %}` blocks and continue_final_message are not supported.

The rendered text carries every special token the template writes, BOS included (Llama 3's
template starts with {{ bos_token }}): encode it without adding BOS again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON as it is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox (cached: a chat renders the same template every turn)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the checkpoint's chat template is not valid Jinja ({e.message}, line {e.lineno}); "
                         "fix tokenizer_config.json's chat_template or choose a named --prompt_style") from None


def render_chat_template(
    template: str, messages: Sequence[Message], add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
) -> str:
    """The text of `messages` (dicts with "role" and "content") in `template`; with
    `add_generation_prompt` followed by the header that starts the assistant's reply.
    `special_tokens` (bos_token, eos_token, ...) are passed to the template as variables."""
    if not messages:
        raise ValueError("a chat template needs at least one message to render")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"a chat message is a dict with 'role' and 'content', got {message!r}")
        chat.append({k: v for k, v in message.items() if v is not None})
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    try:
        # tools and documents are None, as transformers passes them without tools (templates test `tools is not none`)
        return compile_chat_template(template).render(messages=chat, tools=None, documents=None,
                                                      add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, or a sandbox refusal
        raise ValueError(f"the chat template refused the conversation: {e}") from None
