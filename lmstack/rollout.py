"""Rollouts for reinforcement learning: ``n`` sampled completions of each prompt of a batch,
with the policy's log-probability of every sampled token.

Prompts of different lengths are left-padded to the rollout budget ``max_prompt_len`` (as HF
and vLLM batch prompts for generation); the decoder's cache skips each row's padding
(:meth:`lmstack.models.decoder.Decoder.init_cache` ``left_pad``), so a padded row continues
exactly as its prompt alone would. One prefill runs over the ``B`` prompts; its cache is
repeated ``n`` times on the batch axis and the ``B * n`` rows decode together. Row ``r``
holds sample ``r % n`` of prompt ``r // n`` (GRPO's groups are consecutive rows).

The compiled core's shapes depend only on ``(B, max_prompt_len, max_new_tokens, n)`` and the
vocabulary, so prompts of any lengths within the budget and any stop ids reuse one compile.

Log-probabilities are the policy's: the untempered, unfiltered log-softmax of the logits
(what a teacher-forced forward pass of the trainer gives, and what PPO / GRPO ratios and KL
terms compare), whatever ``temperature``, ``top_k`` and ``top_p`` drew the token. (TRL's
GRPO divides the logits by the sampling temperature first; with temperature 1 and no top-k /
top-p the two agree and equal the sampling distribution.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lmstack.config import ConfigError
from lmstack.data.sources import DataError
from lmstack.generate import sample_token
from lmstack.sharding import MeshError, batch_sharding, constrain, data_parallel_size

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """``B * n`` sampled rows; row ``r`` is sample ``r % n`` of prompt ``r // n``.

    - ``prompt_tokens`` int32 (B*n, P): each prompt left-padded with ``pad_id`` to P = ``max_prompt_len``.
    - ``prompt_lengths`` int32 (B*n,): real prompt tokens (the last ones of ``prompt_tokens``).
    - ``completion_tokens`` int32 (B*n, N): the sampled tokens, ``pad_id`` after a row's stop id.
    - ``completion_logps`` float32 (B*n, N): log pi(token | prompt, earlier tokens), the untempered
      log-softmax; 0 where masked.
    - ``completion_mask`` bool (B*n, N): True on the sampled tokens, the stop id included (it is an
      action of the policy, as TRL and verl count it).
    - ``completion_lengths`` int32 (B*n,): the mask's row sums.
    - ``stopped`` bool (B*n,): the row ended with a stop id (False: cut at ``max_new_tokens``).
    """

    prompt_tokens: Array
    prompt_lengths: Array
    completion_tokens: Array
    completion_logps: Array
    completion_mask: Array
    completion_lengths: Array
    stopped: Array


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "max_new_tokens", "temperature", "top_k", "top_p"))
def _rollout(graphdef, state, prompt_bp, prompt_lengths_b, is_stop_v, pad_id, rng, *, n, max_new_tokens, temperature,
             top_k, top_p) -> Rollout:
    model = nnx.merge(graphdef, state)
    b, p = prompt_bp.shape
    left_pad_b = p - prompt_lengths_b
    cache = model.init_cache(b, p + max_new_tokens, left_pad=left_pad_b)
    logits, cache = model(prompt_bp, cache=cache)
    # the n samples of a prompt share its prefill: repeat the cache rows, then decode b * n rows
    cache = {**cache, "k": jnp.repeat(cache["k"], n, axis=1), "v": jnp.repeat(cache["v"], n, axis=1),
             "left_pad": jnp.repeat(cache["left_pad"], n)}
    last_logits = constrain(jnp.repeat(logits[:, -1], n, axis=0), ("batch", "activation_vocab"))
    pick = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)

    def step(carry, r):
        last_logits, cache, state, done = carry
        tok = pick(last_logits, r)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1), tok[:, None], 1)[:, 0]
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        done = done | is_stop_v[tok]
        # the weights ride in the carry: nnx variables must belong to the scan's trace level
        logits, cache = nnx.merge(graphdef, state)(tok[:, None], cache=cache)
        return (logits[:, -1], cache, state, done), (tok, jnp.where(live, logp, 0.0), live)

    done = jnp.zeros((b * n,), bool)
    (_, _, _, done), (tokens, logps, mask) = jax.lax.scan(step, (last_logits, cache, state, done),
                                                          jax.random.split(rng, max_new_tokens))
    return Rollout(
        prompt_tokens=jnp.repeat(prompt_bp, n, axis=0),
        prompt_lengths=jnp.repeat(prompt_lengths_b, n),
        completion_tokens=tokens.T,
        completion_logps=logps.T,
        completion_mask=mask.T,
        completion_lengths=jnp.sum(mask, axis=0, dtype=jnp.int32),
        stopped=done,
    )


def sample_rollouts(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    max_prompt_len: int,
    rng: Array,
    stop_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    budget_key: str = "max_prompt_len",
) -> Rollout:
    """``n`` completions of up to ``max_new_tokens`` tokens for each of the ``B`` token-id
    ``prompts``, sampled from the decoder ``nnx.merge(graphdef, state)`` (see :class:`Rollout`).

    A row ends after its first token in ``stop_ids``. Sampling is greedy at temperature 0,
    else tempered and restricted by ``top_k`` / ``top_p`` (:func:`lmstack.generate.sample_token`).
    With ``mesh``, the rows are split over its ``('data', 'fsdp')`` axes (``B`` must divide
    evenly); ``state`` is used where it lies (the trainer's sharded parameters).

    Raises DataError for an empty prompt or one longer than ``max_prompt_len`` (the message
    names ``budget_key``, the config key that sets it), ConfigError when a learned-position
    model (gpt2 style) has too few positions, MeshError when ``B`` does not split over the mesh.
    """
    cfg = nnx.merge(graphdef, state).cfg
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DataError(f"prompt {i} is empty: a rollout continues at least one token (start prompts with bos)")
        if len(prompt) > max_prompt_len:
            raise DataError(f"prompt {i} has {len(prompt)} tokens, more than the rollout budget {budget_key}="
                            f"{max_prompt_len}: raise {budget_key} or shorten the prompt")
    longest = max(len(p) for p in prompts)
    if cfg.style == "gpt2" and longest + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(f"a prompt of {longest} tokens + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"{cfg.max_seq_len} learned positions: lower max_new_tokens or shorten the prompts")
    bad_stops = [t for t in stop_ids if not 0 <= t < cfg.vocab_size]
    if bad_stops:
        raise ConfigError(f"stop ids {bad_stops} are outside the model's vocabulary of {cfg.vocab_size} ids: "
                          "give stop ids of the policy's tokenizer")
    b = len(prompts)
    if mesh is not None and b % data_parallel_size(mesh):
        raise MeshError(f"{b} rollout prompts do not split over the mesh's {data_parallel_size(mesh)} data-parallel "
                        f"devices (data x fsdp): use a multiple of {data_parallel_size(mesh)} prompts")
    padded = np.full((b, max_prompt_len), pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        padded[i, max_prompt_len - len(prompt):] = prompt
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    is_stop = np.zeros((cfg.vocab_size,), bool)
    is_stop[list(stop_ids)] = True
    args = (padded, lengths, is_stop, np.int32(pad_id), rng)
    kwargs = dict(n=n, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                  top_p=float(top_p))
    if mesh is None:
        return _rollout(graphdef, state, *args, **kwargs)
    rows = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        return _rollout(graphdef, state, jax.device_put(padded, rows), jax.device_put(lengths, rows), *args[2:],
                        **kwargs)
