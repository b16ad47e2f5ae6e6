"""Chat templates: conversations rendered to text with Jinja, as Hugging Face transformers does.

The environment copies transformers' ``utils/chat_template_utils.py`` (``_compile_jinja_template``):
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols``
extension, a ``{% generation %}`` block that renders its body (transformers uses it to mark
assistant tokens), the globals ``raise_exception(message)`` and ``strftime_now(format)``, and a
``tojson`` filter that keeps non-ASCII text (``ensure_ascii=False``). Templates see
``messages``, ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...)
and any extra variables.

The rendered text carries every special token the template writes (Llama 3 writes
``bos_token``), so encode it with ``Tokenizer.encode``, which adds none: what HF's
``apply_chat_template(tokenize=True)`` does.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import json
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.data.sources import DataError

# ChatML, as in the transformers chat-templating guide (SmolLM2 and Qwen speak it).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# No markup: the messages' contents back to back (prompt/completion text for base models).
NONE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "none": NONE}


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = _strftime_now


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """``messages`` (``[{"role": ..., "content": ...}, ...]``) rendered by the Jinja ``template``.

    ``add_generation_prompt`` appends the header that starts an assistant reply; ``extra``
    becomes template variables too (other special tokens, ``tools``, ...). Raises
    ``DataError`` naming the template line for a syntax error, a ``raise_exception`` call or
    any other failure while rendering.
    """
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except Exception as e:  # a template is a program: raise_exception, undefined values, 1/0, ...
        raise _template_error(template, e, _template_line(e)) from None


def resolve_template(spec: str, tokenizer: Any, *, key: str = "data.chat_template") -> str:
    """The chat template ``spec`` names: "" the tokenizer's own (``tokenizer.chat_template``), a
    built-in name (``chatml``, ``llama3``, ``none``), or a custom Jinja template (text with
    ``{{`` or ``{%``), checked for syntax here. ``key`` names the setting for errors. Raises
    ``DataError`` when the tokenizer has no template, the name is unknown, or the Jinja is invalid.
    """
    builtins = ", ".join(TEMPLATES)
    if not spec:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise DataError(f"{key}: empty means the tokenizer's own chat template, but the {tokenizer.kind} "
                            f"tokenizer has none: pass one of {builtins} or a Jinja template")
        _compile(own)
        return own
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        _compile(spec)
        return spec
    close = difflib.get_close_matches(spec, TEMPLATES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise DataError(f"{key}: {spec!r} is neither a built-in chat template nor Jinja: {hint}"
                    f"pass one of {builtins}, a Jinja template, or empty for the tokenizer's own")


@functools.lru_cache(maxsize=16)  # SFT renders every conversation several times with one template
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise _template_error(template, e, e.lineno) from None


def _template_line(error: BaseException) -> int | None:
    """The template line being rendered when ``error`` was raised (jinja rewrites tracebacks
    so frames of compiled templates carry the template's file name and line)."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _template_error(template: str, error: BaseException, line: int | None) -> DataError:
    message = " ".join(str(getattr(error, "message", None) or error).split())  # one line
    if line is None:
        return DataError(f"chat template: {message}: fix the template or choose another")
    text = template.splitlines()[line - 1].strip() if line <= len(template.splitlines()) else ""
    return DataError(f"chat template line {line} ({text[:80]!r}): {message}: fix the template or choose another")
