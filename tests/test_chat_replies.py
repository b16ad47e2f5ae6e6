"""Batched greedy replies equal one-at-a-time greedy chat replies, cut at the end of turn."""

import pytest
from flax import nnx

from lmstack.chat import greedy_replies, prompt_ids, reply, stream_tokens
from lmstack.config import ConfigError
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.models.decoder import Decoder, DecoderConfig

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, please."}],
    [{"role": "user", "content": "2+2?"}],
]
NEW = 10


@pytest.fixture(scope="module")
def model():
    cfg = DecoderConfig(style="llama", vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_seq_len=160, init_std=0.2)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def one_at_a_time(model, tokenizer, conversations):
    return [reply(model, tokenizer, m, template="chatml", max_new_tokens=NEW, temperature=0.0).split("<|im_end|>")[0]
            for m in conversations]


def test_batched_replies_equal_one_at_a_time(model):
    tokenizer = ByteTokenizer()
    want = one_at_a_time(model, tokenizer, CONVERSATIONS)
    assert len(set(want)) == 3 and all(len(w) > 0 for w in want)
    # 2 rows a batch: the last batch is filled with a repeat; the prompts are of different lengths
    assert greedy_replies(model, tokenizer, CONVERSATIONS, template="chatml", max_new_tokens=NEW,
                          batch_size=2) == want


def test_replies_stop_at_the_stop_id(model):
    ids = list(stream_tokens(model, prompt_ids(ByteTokenizer(), CONVERSATIONS[0], "chatml"), max_new_tokens=NEW,
                             stop=set()))

    class StopsEarly(ByteTokenizer):
        eos_id = ids[3]  # the 4th token of the first reply ends it

    tokenizer = StopsEarly()
    want = one_at_a_time(model, tokenizer, CONVERSATIONS)
    assert want[0] == tokenizer.decode(ids[:ids.index(ids[3])])
    assert greedy_replies(model, tokenizer, CONVERSATIONS, template="chatml", max_new_tokens=NEW,
                          batch_size=2) == want


def test_a_prompt_past_the_context_is_one_line(model):
    long = [{"role": "user", "content": "x" * 150}]
    n = len(prompt_ids(ByteTokenizer(), long, "chatml"))
    with pytest.raises(ConfigError) as e:
        greedy_replies(model, ByteTokenizer(), [long], template="chatml", max_new_tokens=NEW)
    assert str(e.value) == (f"the longest conversation is {n} tokens, which with max_new_tokens={NEW} exceeds the "
                            f"model's context of 160: lower max_new_tokens or shorten the messages")
