"""Hugging Face ``tokenizers`` tokenizers: kind ``hf``, the tokenizer of HF model folders.

A folder holds ``tokenizer.json`` (the `tokenizers` library's whole pipeline: normaliser,
pre-tokeniser, model, post-processor, decoder, added tokens) and ``tokenizer_config.json``
(special tokens by role, ``add_bos_token``, ``chat_template``). :meth:`HFTokenizer.save`
writes both, so an exported model folder loads with ``transformers.AutoTokenizer``, and
:meth:`HFTokenizer.from_dir` reads them back identically.

lmstack adds special tokens itself (``Tokenizer.encode`` adds none; the data pipeline puts
bos first where ``add_bos`` and eos last), so the `tokenizers` post-processor is used only by
:meth:`HFTokenizer.encode_pair`, HF's ``tokenizer(text, text_pair)``, and
:meth:`HFTokenizer.encode_framed`, HF's ``tokenizer(text, truncation=True, max_length=n)`` (the
input of a sequence classifier). The padding and truncation a ``tokenizer.json`` may carry
are dropped: lmstack never pads, and truncates only in ``encode_framed``, to the length asked.

Needs the optional ``tokenizers`` package.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import ml_collections as mlc

from lmstack import registry
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import write_atomic

if TYPE_CHECKING:
    import tokenizers

_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_MAP_FILE = "special_tokens_map.json"
_TEMPLATE_FILE = "chat_template.jinja"
# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, less the additional ones.
_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_OWN_ROLES = ("bos_token", "eos_token", "pad_token")  # constructor arguments, not special_tokens
# BERT's specials, in the order HF's BertConverter adds them.
_BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


@registry.register("tokenizer.hf")
class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with lmstack's special ids, ``add_bos`` and chat template.

    ``bos_id``/``eos_id``/``pad_id``: the ids of those roles (None: none). ``add_bos``:
    documents and prompts start with bos (Llama: true; GPT-2, SmolLM2: false).
    ``special_tokens``: the ids of the other HF roles (``unk_token``, ``sep_token``,
    ``cls_token``, ``mask_token``). ``chat_template``: the tokenizer's own Jinja template.
    Raises ``DataError`` for an id outside the vocabulary, or ``add_bos`` without a bos.
    """

    kind = "hf"

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ):
        # A private copy: the caller's tokenizer keeps its padding and truncation.
        self._tok = type(tokenizer).from_str(tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._json = self._tok.to_str()
        self._framing: dict[int, tokenizers.Tokenizer] = {}  # encode_framed's truncating copies
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        for role in self.special_tokens:
            if role not in _ROLES or role in _OWN_ROLES:
                others = ", ".join(r for r in _ROLES if r not in _OWN_ROLES)
                raise ValueError(f"HFTokenizer: special_tokens role {role!r} is not one of {others}: "
                                 "pass bos/eos/pad as bos_id/eos_id/pad_id")
        for role, i in self._named_ids().items():
            if not 0 <= i < self.vocab_size:
                raise DataError(f"hf tokenizer: {role} id {i} is outside the vocabulary of {self.vocab_size} "
                                "tokens: fix the special-token settings")
        if self.add_bos and bos_id is None:
            raise DataError("hf tokenizer: add_bos is set but there is no bos token: "
                            "set bos_token in tokenizer_config.json, or add_bos_token to false")
        specials = json.dumps([self._named_ids(), self.add_bos], sort_keys=True)
        self.identity = "hf-" + hashlib.sha256(f"{self._json}\n{specials}".encode()).hexdigest()

    def _named_ids(self) -> dict[str, int]:
        named = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, **self.special_tokens}
        return {role: i for role, i in named.items() if i is not None}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Role -> token text (``{"bos_token": "<s>", ...}``), as transformers' ``special_tokens_map``;
        chat templates get these as variables."""
        return {role: self._tok.id_to_token(i) for role, i in self._named_ids().items()}

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, no special tokens added (HF's ``add_special_tokens=False``).
        Special tokens written in the text (``<|im_start|>``) still encode as their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` through the tokenizer's decoder (byte-level pieces are joined into
        UTF-8); special tokens are kept. Ids outside the vocabulary are dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text of the wrapped tokenizer."""
        return self._tok.to_str()

    def encode_pair(self, text: str, text_pair: str | None = None) -> tuple[list[int], list[int]]:
        """``(input_ids, token_type_ids)`` framed by the tokenizer's post-processor, as HF's
        ``tokenizer(text, text_pair)``: ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` with type
        ids 0 then 1 for BERT; bos first for Llama. For encoder inputs and sentence pairs."""
        enc = self._tok.encode(text, text_pair, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def encode_framed(self, text: str, max_len: int | None = None) -> list[int]:
        """The ids of ``text`` framed by the tokenizer's post-processor and cut to ``max_len``
        tokens (None: not cut), as HF's ``tokenizer(text, truncation=True, max_length=max_len)``:
        the text is shortened and the frame kept, ``[CLS] text [SEP]`` for BERT, ``<s> text``
        for Llama. Without a post-processor, ``[bos] + text`` where ``add_bos`` (lmstack's
        framing of documents and prompts), cut to ``max_len``."""
        if self._tok.post_processor is None:
            ids = ([self.bos_id] if self.add_bos else []) + self.encode(text)
            return ids[:max_len] if max_len else ids
        if not max_len:
            return self._tok.encode(text, add_special_tokens=True).ids
        framing = self._framing.get(max_len)
        if framing is None:  # a truncating copy per length; the main copy never truncates
            framing = type(self._tok).from_str(self._json)
            framing.enable_truncation(max_len)
            self._framing[max_len] = framing
        return framing.encode(text, add_special_tokens=True).ids

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a Hugging Face model folder, read as transformers' ``from_pretrained`` does.

        Special tokens come from ``tokenizer_config.json`` (strings or AddedToken dicts), then
        ``special_tokens_map.json`` overrides them. Encoders without bos/eos (BERT) take
        ``cls_token``/``sep_token`` in those roles, since their post-processor frames every
        sequence ``[CLS] ... [SEP]``. ``add_bos`` is ``add_bos_token`` where set, else whether the
        post-processor starts a sequence with bos (how HF fast tokenizers add it). The chat
        template is ``chat_template.jinja`` if present, else the config's ``chat_template`` (the
        ``default`` one of a named list). Raises ``DataError`` for a missing or unreadable file
        or a special token the vocabulary lacks.
        """
        d = pathlib.Path(path).expanduser()
        tok_path = d / _TOKENIZER_FILE
        if not tok_path.is_file():
            raise DataError(
                f"hf tokenizer: no {_TOKENIZER_FILE} in {str(path)!r}: pass a Hugging Face model folder "
                "that has one (a folder with only a slow tokenizer needs converting with transformers first)"
            )
        lib = _library()
        try:
            tok = lib.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise DataError(f"hf tokenizer: {tok_path}: not a readable tokenizer.json "
                            f"({str(e).splitlines()[0]}): re-download or re-save it") from None
        config = _read_json(d / _CONFIG_FILE)
        tokens = {role: (_content(config[role]), d / _CONFIG_FILE) for role in _ROLES if config.get(role)}
        special_map = _read_json(d / _SPECIAL_MAP_FILE)
        tokens.update({role: (_content(special_map[role]), d / _SPECIAL_MAP_FILE)
                       for role in _ROLES if special_map.get(role)})
        ids = {}
        for role, (content, source) in tokens.items():
            ids[role] = tok.token_to_id(content)
            if ids[role] is None:
                raise DataError(f"hf tokenizer: {source}: {role} {content!r} is not in {_TOKENIZER_FILE}'s "
                                f"vocabulary: fix {source.name} or remove the key")
        bos_id = ids.get("bos_token", ids.get("cls_token"))
        eos_id = ids.get("eos_token", ids.get("sep_token"))
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        template_path = d / _TEMPLATE_FILE
        if template_path.is_file():
            chat_template = template_path.read_text(encoding="utf-8")
        else:
            chat_template = _default_template(config.get("chat_template"))
        return cls(
            tok, bos_id=bos_id, eos_id=eos_id, pad_id=ids.get("pad_token"), add_bos=add_bos,
            chat_template=chat_template,
            special_tokens={role: i for role, i in ids.items() if role not in _OWN_ROLES},
        )

    @classmethod
    def from_wordpiece(cls, vocab_txt: str | os.PathLike, lowercase: bool = True) -> HFTokenizer:
        """BERT's WordPiece tokenizer from its ``vocab.txt`` (one token per line, id = line number),
        built as transformers' ``convert_slow_tokenizer.BertConverter`` does: BERT normaliser
        (lower-cased if ``lowercase``, Chinese characters split, accents kept unless lower-casing
        strips them), BERT pre-tokeniser, ``##`` continuation pieces, ``[CLS] A [SEP] (B [SEP])``
        post-processor. bos = ``[CLS]``, eos = ``[SEP]``, pad = ``[PAD]``, ``add_bos``, so a
        document encodes as ``[CLS] ... [SEP]``. Raises ``DataError`` for a missing file or a
        vocabulary without one of BERT's five special tokens.
        """
        p = pathlib.Path(vocab_txt).expanduser()
        if not p.is_file():
            raise DataError(f"wordpiece tokenizer: no such vocabulary file {str(vocab_txt)!r}: pass a BERT vocab.txt")
        lib = _library()
        vocab = lib.models.WordPiece.read_file(str(p))
        missing = [t for t in _BERT_SPECIALS.values() if t not in vocab]
        if missing:
            raise DataError(f"wordpiece tokenizer: {p}: the vocabulary lacks {', '.join(missing)}: "
                            "pass a BERT vocab.txt with [PAD], [UNK], [CLS], [SEP] and [MASK]")
        tok = lib.Tokenizer(lib.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = lib.normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = lib.pre_tokenizers.BertPreTokenizer()
        ids = {role: vocab[t] for role, t in _BERT_SPECIALS.items()}
        tok.post_processor = lib.processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["cls_token"]), ("[SEP]", ids["sep_token"])],
        )
        tok.decoder = lib.decoders.WordPiece(prefix="##")
        tok.add_special_tokens(list(_BERT_SPECIALS.values()))
        return cls(
            tok, bos_id=ids["cls_token"], eos_id=ids["sep_token"], pad_id=ids["pad_token"], add_bos=True,
            special_tokens={role: i for role, i in ids.items() if role not in _OWN_ROLES},
        )

    @classmethod
    def build(cls, tcfg: mlc.ConfigDict, documents: Sequence[str]) -> HFTokenizer:
        """The HF model folder ``tcfg.path`` names (``data.tokenizer.path``)."""
        if not tcfg.path:
            raise DataError("data.tokenizer.path: empty, but the hf tokenizer reads a Hugging Face model folder: "
                            "pass --config.data.tokenizer.path=DIR (a folder with tokenizer.json)")
        return cls.from_dir(tcfg.path)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if
        missing), loadable by ``transformers.AutoTokenizer`` as a ``PreTrainedTokenizerFast``
        and by :meth:`from_dir`. ``clean_up_tokenization_spaces`` is false so HF decodes as lmstack does."""
        d = pathlib.Path(directory)
        write_atomic(d / _TOKENIZER_FILE, self._tok.to_str(pretty=True).encode("utf-8"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomic(d / _CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8"))

    @classmethod
    def from_saved(cls, directory: pathlib.Path, spec: dict) -> HFTokenizer:
        return cls.from_dir(directory)


def _library():
    try:
        import tokenizers
    except ImportError:
        raise DataError("hf tokenizer: the tokenizers package is not installed: pip install tokenizers") from None
    return tokenizers


def _read_json(path: pathlib.Path) -> dict:
    """A JSON object file's contents; {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"hf tokenizer: {path}: not valid JSON ({e}): re-download or re-save it") from None
    if not isinstance(data, dict):
        raise DataError(f"hf tokenizer: {path}: not a JSON object: re-download or re-save it")
    return data


def _content(token: str | dict) -> str:
    """A special token's text: a plain string, or the ``content`` of a serialised AddedToken."""
    return token["content"] if isinstance(token, dict) else token


def _default_template(template: str | list | None) -> str | None:
    """``chat_template`` of tokenizer_config.json: a string, or a list of ``{"name", "template"}``
    of which transformers uses ``default``."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template
