"""Tokenizers: round trips, special ids, SentencePiece training, caching and persistence."""

import inspect
import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack import registry
from lmstack.configs.base import base_config
from lmstack.data import tokenizers
from lmstack.data.sources import DataError
from lmstack.registry import UnknownNameError
from lmstack.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_sentencepiece,
    train_tokenizer_files,
)

# Tiny Shakespeare's 65 characters, as in nanoGPT's shakespeare_char.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Python source to train small SentencePiece models on: a few modules, ~60 KB.
CODE_DOCS = [inspect.getsource(m) for m in (textwrap, json.encoder, json.decoder)]
SP_VOCAB = 400
# U+2581 is SentencePiece's own space marker and decodes to a space; surrogates are not text.
any_text = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "code.model"
    train_sentencepiece(CODE_DOCS, vocab_size=SP_VOCAB, out_path=path)
    return SentencePieceTokenizer.load(path)


def sp_cfg(**overrides):
    cfg = base_config().data
    cfg.tokenizer.vocab_size = SP_VOCAB
    for key, value in overrides.items():
        cfg.tokenizer[key] = value
    return cfg


@given(any_text)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_special_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.decode([257, 104, 105, 258, 256]) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character decodes as a replacement


def test_char_tokenizer_matches_shakespeare_char():
    text = "".join(reversed(SHAKESPEARE_CHARS)) * 3
    tok = CharTokenizer.from_documents([text[:100], text[100:]])
    assert tok.vocab_size == 65
    assert tok.chars == sorted(SHAKESPEARE_CHARS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)
    assert tok.encode("\n !") == [0, 1, 2]
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.from_documents(["abc"])
    with pytest.raises(DataError) as e:
        tok.encode("cab€a")
    assert str(e.value) == (
        "char tokenizer: character '€' at position 3 is not in the 3-character vocabulary: "
        "remove it or rebuild the tokenizer on text containing it"
    )


def test_sentencepiece_specials_and_whitespace_pieces(sp_tok):
    assert sp_tok.vocab_size == SP_VOCAB
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    assert sp_tok.encode("\n") == [4] and sp_tok.encode("\t") == [5]
    # Indentation is not one token per space.
    assert len(sp_tok.encode("        ")) < 4


def test_sentencepiece_round_trips_python_source(sp_tok):
    source = inspect.getsource(tokenizers)  # code it was not trained on
    assert sp_tok.decode(sp_tok.encode(source)) == source
    tricky = "def f(x):\n\tif x:\r\n\t\treturn  x   \n\n\n  é ☃ 😀\x00"
    assert sp_tok.decode(sp_tok.encode(tricky)) == tricky
    assert sp_tok.decode(sp_tok.encode(" leading")) == " leading"


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_sentencepiece_round_trips_any_text(sp_tok, text):
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_sentencepiece_training_is_deterministic_and_atomic(tmp_path, sp_tok):
    path = train_sentencepiece(CODE_DOCS, vocab_size=SP_VOCAB, out_path=tmp_path / "m.model")
    assert path.read_bytes() == sp_tok.model_proto
    assert [p.name for p in tmp_path.iterdir()] == ["m.model"]  # no temporary file left behind


def test_sentencepiece_training_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data\.tokenizer\.model_type: 'wordpiece' is not bpe or unigram"):
        train_sentencepiece(CODE_DOCS, vocab_size=SP_VOCAB, model_type="wordpiece", out_path=tmp_path / "m")
    with pytest.raises(DataError) as e:
        train_sentencepiece(["tiny text"], vocab_size=SP_VOCAB, out_path=tmp_path / "m")
    assert str(e.value).startswith(
        f"sentencepiece: training failed (Vocabulary size too high ({SP_VOCAB}). Please set it to a value <= "
    )
    assert str(e.value).endswith("check data.tokenizer.vocab_size against the size of the training text")
    assert "\n" not in str(e.value)


def test_chunks_are_lossless_and_fit_sentencepiece():
    docs = ["short\n", "x" * 10_000 + "\n" + "line\n" * 2000, "é" * 3000]
    chunks = list(tokenizers._chunks(docs))
    assert "".join(chunks) == "".join(docs)
    assert max(len(c.encode()) for c in chunks) <= 4192


def test_sample_chunks_is_capped_and_spread():
    chunks = [f"{i:04d}" * 25 for i in range(1000)]  # 100 characters each
    kept = tokenizers._sample_chunks(chunks, 10_000)
    assert sum(map(len, kept)) <= 10_000 and len(kept) == 100
    assert kept[0] == chunks[9] and kept[-1] == chunks[999]  # every tenth chunk, first to last
    assert tokenizers._sample_chunks(chunks, 0) == chunks


def test_build_tokenizer_kinds():
    cfg = base_config().data
    cfg.tokenizer.kind = "byte"
    assert isinstance(build_tokenizer(cfg, ["x"]), ByteTokenizer)
    cfg.tokenizer.kind = "char"
    assert build_tokenizer(cfg, ["abca"]).chars == ["a", "b", "c"]
    cfg.tokenizer.kind = "wordpeice"
    with pytest.raises(UnknownNameError) as e:
        build_tokenizer(cfg, ["x"])
    assert str(e.value) == (
        "data.tokenizer.kind: unknown tokenizer 'wordpeice': registered: byte, char, hf, sentencepiece"
    )


def test_tokenizer_kinds_are_registered_plugins():
    assert registry.names("tokenizer") == ["byte", "char", "hf", "sentencepiece"]
    for cls in (ByteTokenizer, CharTokenizer, SentencePieceTokenizer):
        assert registry.lookup("tokenizer", cls.kind) is cls


def test_add_bos_follows_the_bos_token(sp_tok):
    assert ByteTokenizer().add_bos and sp_tok.add_bos
    assert not CharTokenizer.from_documents(["ab"]).add_bos


def test_build_sentencepiece_trains_once_then_hits_the_cache(tmp_path, monkeypatch):
    first = build_tokenizer(sp_cfg(), CODE_DOCS)
    cached = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("sp-") and cached[0].suffix == ".model"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(tokenizers, "train_sentencepiece", no_training)
    second = build_tokenizer(sp_cfg(), CODE_DOCS)
    assert second.identity == first.identity
    # Other documents or settings miss the cache.
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(sp_cfg(), CODE_DOCS[:2])
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(sp_cfg(vocab_size=SP_VOCAB + 1), CODE_DOCS)


def test_build_sentencepiece_from_path(tmp_path, sp_tok):
    path = tmp_path / "given.model"
    path.write_bytes(sp_tok.model_proto)
    assert build_tokenizer(sp_cfg(path=str(path)), []).identity == sp_tok.identity
    with pytest.raises(DataError) as e:
        build_tokenizer(sp_cfg(path=str(tmp_path / "nope.model")), [])
    assert str(e.value) == (
        f"data.tokenizer.path: no such SentencePiece model {str(tmp_path / 'nope.model')!r}: "
        "pass a .model file, or leave it empty to train one"
    )


@pytest.mark.parametrize("kind", ["byte", "char", "sentencepiece"])
def test_save_and_load_round_trip(tmp_path, sp_tok, kind):
    tok = {
        "byte": ByteTokenizer(),
        "char": CharTokenizer.from_documents(CODE_DOCS),
        "sentencepiece": sp_tok,
    }[kind]
    save_tokenizer(tok, tmp_path / "run" / "tokenizer")
    loaded = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert (loaded.kind, loaded.vocab_size, loaded.identity) == (tok.kind, tok.vocab_size, tok.identity)
    text = CODE_DOCS[0][:500]
    assert loaded.encode(text) == tok.encode(text)


def test_load_tokenizer_without_spec(tmp_path):
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (
        f"tokenizer: no tokenizer.json in {str(tmp_path)!r}: pass the tokenizer/ folder of a run's workdir"
    )


def test_load_tokenizer_unknown_kind(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece", "vocab_size": 3}')
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (
        f"tokenizer: {tmp_path / 'tokenizer.json'}: unknown kind 'wordpiece': re-save the tokenizer "
        "(known kinds: byte, char, hf, sentencepiece)"
    )


def test_save_tokenizer_refuses_an_unregistered_kind(tmp_path):
    class Words(ByteTokenizer):
        kind = "words"

    unknown = "^unknown tokenizer 'words': registered: byte, char, hf, sentencepiece$"
    with pytest.raises(UnknownNameError, match=unknown):
        save_tokenizer(Words(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_train_tokenizer_files(tmp_path):
    inputs = []
    for i, doc in enumerate(CODE_DOCS):
        inputs.append(tmp_path / f"in{i}.py")
        inputs[-1].write_text(doc)
    out = train_tokenizer_files(inputs, SP_VOCAB, tmp_path / "out" / "tok.model", model_type="unigram")
    tok = SentencePieceTokenizer.load(out)
    assert tok.vocab_size == SP_VOCAB
    assert tok.decode(tok.encode(CODE_DOCS[1])) == CODE_DOCS[1]
    missing = r"^--input: no such file '.*missing\.txt': pass existing text files$"
    with pytest.raises(DataError, match=missing):
        train_tokenizer_files([tmp_path / "missing.txt"], SP_VOCAB, tmp_path / "x.model")
