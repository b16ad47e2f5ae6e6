"""Text generation: one prefill over the prompt, then cached decoding one token at a time.

The whole generation (prefill + a ``lax.scan`` over new tokens) is one compiled function.
Sampling is greedy (temperature 0) or temperature sampling restricted by top-k and/or
top-p (nucleus). :func:`generate_sliding` generates past the model's context window the
way nanoGPT does, conditioning on the most recent tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def sample_token(logits_bv: Array, rng: Array, *, temperature: float, top_k: int, top_p: float) -> Array:
    """Next token ids (b,) from last-position logits."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if 0.0 < top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, prompt_bt, rng, *, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, t = prompt_bt.shape
    cache = model.init_cache(b, t + max_new_tokens)
    logits, cache = model(prompt_bt, cache=cache)
    pick = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)

    def step(carry, r):
        last_logits, cache, state = carry
        tok = pick(last_logits, r)
        # the weights ride in the carry: nnx variables must belong to the scan's trace level
        logits, cache = nnx.merge(graphdef, state)(tok[:, None], cache=cache)
        return (logits[:, -1], cache, state), tok

    _, tokens = jax.lax.scan(step, (logits[:, -1], cache, state), jax.random.split(rng, max_new_tokens))
    return tokens.T


def generate(
    model: nnx.Module,
    prompt_bt: Array,
    *,
    max_new_tokens: int,
    rng: Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """``max_new_tokens`` continuation tokens (b, n) for equal-length prompts (b, t)."""
    limit = getattr(model.cfg, "max_seq_len", None)
    total = prompt_bt.shape[1] + max_new_tokens
    if model.cfg.style == "gpt2" and limit is not None and total > limit:
        raise ValueError(
            f"prompt ({prompt_bt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's learned positions ({limit}): shorten the prompt or lower --max-new-tokens"
        )
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_bt, jnp.int32),
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )


def generate_sliding(
    model: nnx.Module,
    prompt_bt: Array,
    *,
    max_new_tokens: int,
    rng: Array,
    window: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """``max_new_tokens`` tokens (b, n) however long, conditioning on at most ``window`` tokens.

    Within the window this is :func:`generate` (same tokens for the same ``rng``). Past it the
    context slides in chunks, as nanoGPT crops its conditioning to the block size: the last
    ``window - window // 4`` tokens are prefilled again and up to ``window // 4`` more are decoded,
    so every token is conditioned on between 3/4 of the window and all of it (nanoGPT: all of
    it, at the cost of one full forward pass per token). A prompt longer than the window is
    cropped to its last ``window`` tokens the same way."""
    if window < 2:
        raise ValueError(f"window={window}: need at least 2 tokens of context")
    chunk = max(1, window // 4)
    keep = window - chunk
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    ctx = jnp.asarray(prompt_bt, jnp.int32)
    if ctx.shape[1] > window:
        ctx = ctx[:, -window:]
    out, remaining, i = [], max_new_tokens, 0
    while remaining > 0:
        if ctx.shape[1] >= window:
            ctx = ctx[:, -keep:]
        n = min(remaining, window - ctx.shape[1])
        new = generate(model, ctx, max_new_tokens=n, rng=rng if i == 0 else jax.random.fold_in(rng, i), **sampling)
        out.append(new)
        ctx = jnp.concatenate([ctx, new], axis=1)
        remaining -= n
        i += 1
    return jnp.concatenate(out, axis=1) if out else jnp.zeros((ctx.shape[0], 0), jnp.int32)
