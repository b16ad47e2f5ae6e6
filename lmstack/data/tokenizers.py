"""Tokenizers: bytes, characters, SentencePiece (trained here, cached), and Hugging Face's.

Every tokenizer satisfies :class:`Tokenizer`. Each kind is a plug-in registered as
``tokenizer.KIND`` (``byte``, ``char``, ``sentencepiece`` here; ``hf`` in
:mod:`lmstack.data.hf_tokenizer`) with three entry points:

- ``build(tcfg, documents)`` (classmethod): the tokenizer the ``data.tokenizer`` section describes;
- ``save(directory)``: write its files into a folder;
- ``from_saved(directory, spec)`` (classmethod): read them back; ``spec`` is the folder's parsed
  ``tokenizer.json``.

A run saves its tokenizer into its workdir (:func:`save_tokenizer`) so ``lmstack sample`` and
``lmstack eval`` rebuild it from there (:func:`load_tokenizer`). The built-in kinds save a small
lmstack spec as ``tokenizer.json`` (``{"kind": ..., ...}``); the ``hf`` kind saves Hugging
Face's own ``tokenizer.json``, which has no ``kind`` key, so any HF model folder loads too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Iterable, Iterator, Protocol, Sequence

import ml_collections as mlc
import sentencepiece as spm

from lmstack import registry
from lmstack.data.sources import DataError

# Bump when the training recipe changes, so cached models trained the old way are not reused.
_SP_RECIPE_VERSION = 1
# SentencePiece refuses longer training sentences (its max_sentence_length, in bytes).
_SP_MAX_SENTENCE_BYTES = 4192
_SPEC_FILE = "tokenizer.json"
_SP_MODEL_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    """What the data layer, the models and the samplers need from a tokenizer."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool  # documents and prompts start with bos_id (never true without one)
    chat_template: str | None  # the tokenizer's own Jinja chat template, if it ships one
    identity: str  # a stable digest of everything that decides the ids, for cache keys

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, adding no special tokens (see ``add_bos``)."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: pathlib.Path) -> None:
        """Write the tokenizer's files into the existing folder ``directory``."""
        ...


@registry.register("tokenizer.byte")
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad, bos and eos."""

    kind = "byte"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    add_bos = True
    chat_template = None
    identity = "byte-v1"

    @classmethod
    def build(cls, tcfg: mlc.ConfigDict, documents: Sequence[str]) -> ByteTokenizer:
        return cls()

    def save(self, directory: pathlib.Path) -> None:
        _save_spec(directory, self)

    @classmethod
    def from_saved(cls, directory: pathlib.Path, spec: dict) -> ByteTokenizer:
        return cls()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@registry.register("tokenizer.char")
class CharTokenizer:
    """One id per character of the corpus it was built from; no special tokens (nanoGPT's char level)."""

    kind = "char"
    bos_id = eos_id = pad_id = None
    add_bos = False
    chat_template = None

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        if len(self._ids) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise DataError("char tokenizer: the vocabulary must be distinct single characters: rebuild it")
        digest = hashlib.sha256("".join(self.chars).encode("utf-8", "surrogatepass"))
        self.identity = "char-" + digest.hexdigest()

    @classmethod
    def from_documents(cls, documents: Iterable[str]) -> CharTokenizer:
        """The sorted set of characters appearing in ``documents``."""
        chars: set[str] = set()
        for doc in documents:
            chars.update(doc)
        return cls(sorted(chars))

    @classmethod
    def build(cls, tcfg: mlc.ConfigDict, documents: Sequence[str]) -> CharTokenizer:
        return cls.from_documents(documents)

    def save(self, directory: pathlib.Path) -> None:
        _save_spec(directory, self, chars=self.chars)

    @classmethod
    def from_saved(cls, directory: pathlib.Path, spec: dict) -> CharTokenizer:
        return cls(spec["chars"])

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            pos = text.index(e.args[0])
            raise DataError(
                f"char tokenizer: character {e.args[0]!r} at position {pos} is not in the "
                f"{self.vocab_size}-character vocabulary: "
                "remove it or rebuild the tokenizer on text containing it"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)


@registry.register("tokenizer.sentencepiece")
class SentencePieceTokenizer:
    """A SentencePiece model; byte fallback means any text encodes. Documents start with bos
    where the model has one (SentencePiece's and Llama's convention)."""

    kind = "sentencepiece"
    chat_template = None

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        # SentencePiece reports a disabled special token as -1.
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        )
        self.add_bos = self.bos_id is not None
        self.identity = "sp-" + hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike, *, key: str = "data.tokenizer.path") -> SentencePieceTokenizer:
        """Read a ``.model`` file; ``key`` names the setting that pointed there, for the error."""
        p = pathlib.Path(path).expanduser()
        if not p.is_file():
            raise DataError(
                f"{key}: no such SentencePiece model {str(path)!r}: pass a .model file, "
                "or leave it empty to train one"
            )
        return cls(p.read_bytes())

    @classmethod
    def build(cls, tcfg: mlc.ConfigDict, documents: Sequence[str]) -> SentencePieceTokenizer:
        """``tcfg.path`` if given, else a model trained on ``documents`` once and cached
        (keys ``vocab_size``, ``model_type``, ``max_train_chars``)."""
        if tcfg.path:
            return cls.load(tcfg.path)
        path = cache_dir() / "tokenizers" / f"sp-{_sp_cache_key(documents, tcfg)}.model"
        if not path.is_file():
            train_sentencepiece(
                documents, vocab_size=tcfg.vocab_size, model_type=tcfg.model_type,
                out_path=path, max_train_chars=tcfg.max_train_chars,
            )
        return cls.load(path)

    def save(self, directory: pathlib.Path) -> None:
        write_atomic(directory / _SP_MODEL_FILE, self.model_proto)
        _save_spec(directory, self, model=_SP_MODEL_FILE)

    @classmethod
    def from_saved(cls, directory: pathlib.Path, spec: dict) -> SentencePieceTokenizer:
        return cls.load(directory / spec["model"], key=str(directory / _SPEC_FILE))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(
    documents: Sequence[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    out_path: str | os.PathLike,
    max_train_chars: int = 4_000_000,
) -> pathlib.Path:
    """Train a SentencePiece model that round-trips code exactly, and write it atomically.

    Training text is the documents cut into line-aligned chunks SentencePiece accepts,
    evenly subsampled to at most ``max_train_chars`` characters; the result is deterministic.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(
            f"data.tokenizer.model_type: {model_type!r} is not bpe or unigram: pass one of those"
        )
    chunks = _sample_chunks(list(_chunks(documents)), max_train_chars)
    if not chunks:
        raise DataError("sentencepiece: no training text: give the tokenizer non-empty documents")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            # Exact round trips for code: no Unicode normalisation, keep every space,
            # no invented leading space, and newline/tab as tokens (dropped by default).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n", "\t"],
            # Indentation runs become single pieces instead of one token per space.
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            max_sentence_length=_SP_MAX_SENTENCE_BYTES,
            # Subsampling is done above, deterministically; the trainer must not reshuffle.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
    except RuntimeError as e:
        # Keep SentencePiece's advice, drop its source location ("...cc(744) [check] advice").
        reason = str(e).strip().splitlines()[-1].rpartition("] ")[2]
        raise DataError(
            f"sentencepiece: training failed ({reason}): "
            "check data.tokenizer.vocab_size against the size of the training text"
        ) from None
    return write_atomic(pathlib.Path(out_path), model.getvalue())


def train_tokenizer_files(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out: str | os.PathLike,
    model_type: str = "bpe",
    max_train_chars: int = 4_000_000,
) -> pathlib.Path:
    """``lmstack tokenizer train``: train a SentencePiece model on text files, one document each."""
    documents = []
    for path in inputs:
        p = pathlib.Path(path)
        if not p.is_file():
            raise DataError(f"--input: no such file {str(path)!r}: pass existing text files")
        try:
            documents.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"--input: {path}: not valid UTF-8 (byte {e.start}): convert it to UTF-8"
            ) from None
    return train_sentencepiece(
        documents, vocab_size=vocab_size, model_type=model_type, out_path=out,
        max_train_chars=max_train_chars,
    )


def with_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """``ids`` after a bos where the tokenizer starts documents with one (``add_bos``), as
    training saw them: prompts, probe sentences and query/document pairs start alike."""
    return [tokenizer.bos_id, *ids] if tokenizer.add_bos else list(ids)


def build_tokenizer(data_cfg: mlc.ConfigDict, documents: Sequence[str]) -> Tokenizer:
    """The tokenizer ``data_cfg.tokenizer`` describes, built by the plug-in its ``kind`` names.

    Raises ``registry.UnknownNameError`` for an unregistered kind, and the plug-in's
    ``DataError`` for bad settings or files."""
    tcfg = data_cfg.tokenizer
    return registry.lookup("tokenizer", tcfg.kind, "data.tokenizer.kind").build(tcfg, documents)


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    """Write ``tok`` into ``directory`` (created if missing) so :func:`load_tokenizer` reads it back.

    Raises ``registry.UnknownNameError`` if ``tok.kind`` is not a registered kind, which could
    not be loaded again."""
    registry.lookup("tokenizer", tok.kind)
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(d)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer :func:`save_tokenizer` wrote into ``directory``, or a Hugging Face model
    folder's (a ``tokenizer.json`` without lmstack's ``kind`` key is HF's own: kind ``hf``).

    Raises ``DataError`` for a missing or unreadable ``tokenizer.json`` or an unknown kind."""
    d = pathlib.Path(directory)
    spec_path = d / _SPEC_FILE
    if not spec_path.is_file():
        raise DataError(
            f"tokenizer: no {_SPEC_FILE} in {str(directory)!r}: pass the tokenizer/ folder of a run's workdir"
        )
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer: {spec_path}: not valid JSON ({e}): re-save the tokenizer") from None
    kind = spec.get("kind", "hf") if isinstance(spec, dict) else None
    if kind not in registry.names("tokenizer"):
        raise DataError(
            f"tokenizer: {spec_path}: unknown kind {kind!r}: re-save the tokenizer "
            f"(known kinds: {', '.join(registry.names('tokenizer'))})"
        )
    return registry.lookup("tokenizer", kind).from_saved(d, spec)


def cache_dir() -> pathlib.Path:
    """``$LMSTACK_CACHE``, default ``~/.cache/lmstack``: derived artefacts safe to delete."""
    return pathlib.Path(os.environ.get("LMSTACK_CACHE") or "~/.cache/lmstack").expanduser()


def _save_spec(directory: pathlib.Path, tok: Tokenizer, **fields) -> None:
    """lmstack's own ``tokenizer.json``: the kind, the vocabulary size and the kind's ``fields``."""
    spec = {"kind": tok.kind, "vocab_size": tok.vocab_size, **fields}
    write_atomic(directory / _SPEC_FILE, json.dumps(spec, ensure_ascii=False, indent=1).encode("utf-8"))


def _sp_cache_key(documents: Sequence[str], tcfg: mlc.ConfigDict) -> str:
    h = hashlib.sha256()
    settings = (_SP_RECIPE_VERSION, tcfg.vocab_size, tcfg.model_type, tcfg.max_train_chars)
    h.update(repr(settings).encode())
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # so document boundaries count too
        h.update(data)
    return h.hexdigest()[:16]


def _chunks(documents: Iterable[str]) -> Iterator[str]:
    """Line-aligned pieces of the documents, each within SentencePiece's sentence length."""
    # 4 bytes per character at most, so this many characters always fit.
    max_chars = _SP_MAX_SENTENCE_BYTES // 4
    for doc in documents:
        current, size = [], 0
        for line in doc.splitlines(keepends=True):
            for start in range(0, len(line), max_chars):
                piece = line[start:start + max_chars]
                nbytes = len(piece.encode("utf-8", "surrogatepass"))
                if size + nbytes > _SP_MAX_SENTENCE_BYTES and current:
                    yield "".join(current)
                    current, size = [], 0
                current.append(piece)
                size += nbytes
        if current:
            yield "".join(current)


def _sample_chunks(chunks: list[str], max_chars: int) -> list[str]:
    """At most ``max_chars`` characters of chunks, spread evenly over the corpus."""
    total = sum(map(len, chunks))
    if max_chars <= 0 or total <= max_chars:
        return chunks
    frac = max_chars / total
    kept = [c for i, c in enumerate(chunks) if int((i + 1) * frac) > int(i * frac)]
    size = sum(map(len, kept))
    while size > max_chars and len(kept) > 1:
        size -= len(kept.pop())
    return kept


def write_atomic(path: pathlib.Path, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` via a temporary file and a rename, so readers never see a
    partial file; creates the parent folder. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

