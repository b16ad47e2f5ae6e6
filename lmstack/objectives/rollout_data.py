"""What the RL objectives that sample from prompts share (objective.grpo, objective.ppo).

Records are conversations whose last message is the reference answer (``data.source`` =
``prompt_completion``, ``sharegpt``, ``alpaca``, e.g. GSM8K's ``question`` / ``answer`` as
``data.prompt_field`` / ``data.completion_field``). The prompt is the conversation before
that answer rendered with ``objective.chat_template`` and the generation prompt (as
:mod:`lmstack.objectives.sft` renders), cut to nothing: a prompt longer than
``objective.max_prompt_len`` tokens is a DataError naming the record.

:class:`RolloutObjective` holds the prompts and answers of each split, samples rollouts
with the policy (:func:`lmstack.rollout.sample_rollouts`) and decodes them for the
registered reward function ``objective.reward`` against each record's answer, or scores
the rows with a trained reward model, ``objective.reward_model``
(:mod:`lmstack.rl.reward_model`; exactly one of the two is set), less
``objective.missing_eos_penalty`` for a completion that ran to ``max_new_tokens`` without a
stop token (TRL ``PPOConfig.missing_eos_penalty``); :func:`sequences` turns a rollout into the
train step's rows and :func:`completion_hidden` / :func:`completion_logps` read them back
teacher-forced.

Collected rows (row ``r`` = sample ``r % n`` of prompt ``r // n``): ``tokens`` int32
(rows, P + N) (prompt left-padded to P = ``max_prompt_len``, then the N = ``max_new_tokens``
completion tokens), ``segment_ids`` (1 on real tokens), ``positions`` (from 0 at each row's
first real token) and ``completion_mask`` (rows, N).
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack.data.chat import resolve_template
from lmstack.data.formats import Conversation, is_format, record_type
from lmstack.data.labelled import shuffled_batches
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.reference import ReferencePolicy
from lmstack.objectives.sft import render
from lmstack.preference.logps import hidden_token_logps
from lmstack.registry import names
from lmstack.rl.reward_model import FrozenRewardModel
from lmstack.rl.rewards import reward_fn
from lmstack.rollout import sample_rollouts

# the keys of config.objective every rollout objective has, with their defaults
ROLLOUT_DEFAULTS = dict(
    chat_template="",  # as objective.sft: "" the tokenizer's own; chatml | llama3 | none | a Jinja template
    max_prompt_len=64,  # the rollout budget for prompts (tokens)
    max_new_tokens=32,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    stop="",  # comma-separated texts of one token each that end a completion (the eos always does)
    reward="",  # a registered reward function: exact_match | gsm8k_strict | gsm8k_flexible
    reward_model="",  # or a trained reward model: an objective.reward_model run's workdir, W or W@STEP
    missing_eos_penalty=0.0,  # subtracted from the reward of a completion cut at max_new_tokens (TRL's)
    loss_chunk=0,  # > 0: completion log-probs that many positions at a time, never the full logits
)


class Prompts:
    """Encoded prompts, one per row: ``tokens`` int32 (n, P) left-padded, ``lengths`` (n,);
    :meth:`rows` gives a batch with each row's ``record`` index (its answer)."""

    def __init__(self, examples: Sequence[dict], max_prompt_len: int, pad_id: int):
        self.lengths = np.array([len(e["tokens"]) for e in examples], np.int32)
        self.tokens = np.full((len(examples), max_prompt_len), pad_id, np.int32)
        for r, e in enumerate(examples):
            self.tokens[r, max_prompt_len - self.lengths[r]:] = e["tokens"]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {"prompt_tokens": self.tokens[index], "prompt_lengths": self.lengths[index],
                "record": np.asarray(index, np.int32)}


class RolloutObjective:
    """The prompts, rollouts and rewards of an RL objective (module docstring); subclasses add
    ``collect`` and ``loss_fn`` and their own ``config_defaults`` over :data:`ROLLOUT_DEFAULTS`."""

    exact_microbatches = True

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg
        self.reference = ReferencePolicy(cfg)
        o = cfg.objective
        self.reward = reward_fn(o.reward) if o.reward else None
        self.reward_model = FrozenRewardModel(o.reward_model) if o.reward_model else None
        self.answers: dict[str, list[str]] = {}
        self.prompts: dict[str, Prompts] = {}

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """The settings no rollout objective can train with, found at load time."""
        o, out, name = cfg.objective, [], cfg.objective.name
        source = cfg.data.source
        if not is_format(source) or record_type(source) is not Conversation:
            chats = ", ".join(n for n in names("format") if record_type(n) is Conversation)
            out.append(f"objective.name={name} reads prompts with their answers, but data.source={source!r} gives "
                       f"{'labelled texts' if is_format(source) else 'documents'}: set --config.data.source to one "
                       f"of {chats} and --config.data.path=FILE")
        for key in ("max_prompt_len", "max_new_tokens"):
            if o[key] < 1:
                out.append(f"objective.{key}={o[key]}: must be at least 1")
        rewards = ", ".join(names("reward"))
        if o.reward and o.reward_model:
            out.append(f"objective.reward={o.reward!r} and objective.reward_model={o.reward_model!r} both give the "
                       f"reward: keep one (--config.objective.reward= scores with the reward model alone)")
        elif not o.reward and not o.reward_model:
            out.append(f"objective.name={name} needs a reward: set --config.objective.reward to one of {rewards} or "
                       f"--config.objective.reward_model=WORKDIR (an objective.reward_model run)")
        elif o.reward and o.reward not in names("reward"):
            out.append(f"objective.reward={o.reward!r} is not a registered reward: choose one of {rewards}")
        if o.missing_eos_penalty < 0:
            out.append(f"objective.missing_eos_penalty={o.missing_eos_penalty}: must be >= 0 (it is subtracted)")
        if not 0 <= o.epsilon_low < 1 or o.epsilon_high < 0:
            out.append(f"objective.epsilon_low={o.epsilon_low}, epsilon_high={o.epsilon_high}: need 0 <= low < 1 "
                       f"and high >= 0")
        if cfg.model.name != "decoder":
            out.append(f"objective.name={name} samples with a KV cache: use model.name=decoder, not "
                       f"{cfg.model.name!r}")
        return out

    def check_spec(self, spec: Any) -> None:
        """Before a training run writes anything: ConfigError unless ``objective.reward_model``
        (when set) is a reward model for this policy (``spec``: the run's spec), as
        :meth:`lmstack.rl.reward_model.FrozenRewardModel.check` says."""
        if self.reward_model is not None:
            self.reward_model.check(spec, self.cfg)

    # --- data ------------------------------------------------------------------------

    @classmethod
    def encode_records(cls, cfg: Any, tokenizer: Tokenizer, records: Sequence[Conversation],
                       split: str) -> tuple[list[dict], list[str]]:
        """Each record's prompt tokens (the conversation before its last message, rendered with
        the generation prompt) and its answer (the last message's text). DataError for a record
        that does not end with an assistant answer or whose prompt exceeds ``max_prompt_len``."""
        o = cfg.objective
        template = resolve_template(o.chat_template, tokenizer, key="objective.chat_template")
        out = []
        for r in records:
            if len(r.messages) < 2 or r.messages[-1]["role"] != "assistant":
                raise DataError(f"{r.where}: a {o.name} record is a prompt and its reference answer, the last "
                                f"message from the assistant: fix the record")
            ids = tokenizer.encode(render(template, r.messages[:-1], tokenizer, add_generation_prompt=True))
            if len(ids) > o.max_prompt_len:
                raise DataError(f"{r.where}: the prompt has {len(ids)} tokens, more than the rollout budget "
                                f"objective.max_prompt_len={o.max_prompt_len}: raise it or shorten the prompt")
            out.append({"tokens": np.asarray(ids, np.int32), "answer": r.messages[-1]["content"]})
        lengths = [len(e["tokens"]) for e in out]
        note = (f"{split}: {len(out):,} prompts, {min(lengths, default=0)}-{max(lengths, default=0)} tokens "
                f"(budget {o.max_prompt_len}), {o.num_generations} completions of up to {o.max_new_tokens} tokens each")
        return out, [note]

    def _prompts(self, examples: Sequence[dict], split: str, tokenizer: Tokenizer) -> Prompts:
        """The split's prompts, kept with their answers for the rewards (``answers[split]``)."""
        self.answers[split] = [e["answer"] for e in examples]
        self.prompts[split] = Prompts(examples, self.cfg.objective.max_prompt_len, pad_id(tokenizer))
        self.tokenizer = tokenizer
        return self.prompts[split]

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        return shuffled_batches(self._prompts(data.train_examples, "train", data.tokenizer),
                                batch_size=c.train.batch_size, seed=c.data.seed, rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        """None: held-out prompts are scored by sampling (``eval.rollout_reward``), not by a loss."""
        self._prompts(data.val_examples, "val", data.tokenizer)
        return []

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The eos id and the one-token texts of ``objective.stop``; DataError for a longer text."""
        ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        for text in (s for s in self.cfg.objective.stop.split(",") if s):
            text = text.encode().decode("unicode_escape")  # "\n" written on the command line
            tok = tokenizer.encode(text)
            if len(tok) != 1:
                raise DataError(f"objective.stop: {text!r} is {len(tok)} tokens for the {tokenizer.kind} tokenizer: "
                                f"give texts of one token each")
            ids += tok
        return ids

    # --- rollouts --------------------------------------------------------------------

    def rollouts(self, run: Any, state: dict, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray,
                 rng: jax.Array, *, n: int, temperature: float) -> Any:
        """:func:`lmstack.rollout.sample_rollouts` of the left-padded prompts with ``state``'s policy."""
        o = self.cfg.objective
        prompts = [row[len(row) - int(k):].tolist() for row, k in zip(prompt_tokens, prompt_lengths)]
        return sample_rollouts(run.graphdef, nnx.merge_state(state["params"], state["frozen"]), prompts, n=n,
                               max_new_tokens=o.max_new_tokens, max_prompt_len=o.max_prompt_len, rng=rng,
                               stop_ids=self.stop_ids(self.tokenizer), temperature=temperature, top_k=o.top_k,
                               top_p=o.top_p, pad_id=pad_id(self.tokenizer), mesh=run.mesh,
                               budget_key="objective.max_prompt_len")

    def completions(self, rollout: Any) -> list[str]:
        """Each row's completion text, the stop token left out."""
        tokens, mask, stopped = (np.asarray(jax.device_get(x)) for x in
                                 (rollout.completion_tokens, rollout.completion_mask, rollout.stopped))
        out = []
        for row, m, s in zip(tokens, mask, stopped):
            ids = row[m].tolist()
            out.append(self.tokenizer.decode(ids[:-1] if s else ids))
        return out

    def rewards(self, run: Any, rollout: Any, answers: Sequence[str]) -> tuple[np.ndarray, dict[str, float]]:
        """float32 (rows,): each row's reward, ``objective.reward`` of its completion text against
        ``answers[row]`` or the reward model's score of the row, less ``missing_eos_penalty``
        where the row did not stop; and the metric ``reward_model_score`` (the scores' mean,
        before the penalty) when a reward model scores."""
        metrics = {}
        if self.reward_model is None:
            rewards = np.array([self.reward(t, a) for t, a in zip(self.completions(rollout), answers)], np.float32)
        else:
            rewards = self.reward_model.scores(rollout, pad_id(self.tokenizer), run.mesh)
            metrics["reward_model_score"] = float(rewards.mean())
        stopped = np.asarray(jax.device_get(rollout.stopped))
        return rewards - np.float32(self.cfg.objective.missing_eos_penalty) * ~stopped, metrics

    def sample(self, run: Any, state: dict, batch: dict, rng: jax.Array) -> tuple[Any, np.ndarray, dict[str, float]]:
        """The collect phase's common part: ``num_generations`` completions of each prompt of
        ``batch`` with ``state``'s policy, their rewards against the records' training answers
        (float32 (rows,), :meth:`rewards`), and the metrics ``reward``, ``reward_std``,
        ``completion_length`` (tokens), ``rollout_s`` (seconds sampling) and ``reward_s``
        (seconds scoring: decoding and the reward function, or the reward model), with
        :meth:`rewards`' own."""
        o = self.cfg.objective
        n = o.num_generations
        host = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
        start = time.perf_counter()
        rollout = self.rollouts(run, state, host["prompt_tokens"], host["prompt_lengths"], rng, n=n,
                                temperature=o.temperature)
        lengths = np.asarray(jax.device_get(rollout.completion_lengths))
        sampled = time.perf_counter()
        answers = [self.answers["train"][int(i)] for i in np.repeat(host["record"], n)]
        rewards, metrics = self.rewards(run, rollout, answers)
        return rollout, rewards, {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                                  "completion_length": float(lengths.mean()), "rollout_s": sampled - start,
                                  "reward_s": time.perf_counter() - sampled, **metrics}

def sequences(rollout: Any) -> dict[str, jax.Array]:
    """The rollout as the train step's batch: ``tokens`` (prompt then completion), ``segment_ids``
    (1 on real tokens), ``positions`` (from 0 at each row's first real token), ``completion_mask``."""
    p = rollout.prompt_tokens.shape[1]
    tokens = jnp.concatenate([rollout.prompt_tokens, rollout.completion_tokens], axis=1)
    real_prompt = jnp.arange(p)[None, :] >= p - rollout.prompt_lengths[:, None]
    real = jnp.concatenate([real_prompt, rollout.completion_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
    return {"tokens": tokens, "segment_ids": real.astype(jnp.int32), "positions": positions,
            "completion_mask": rollout.completion_mask.astype(jnp.int32)}


def completion_hidden(model: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    """(rows, N, d): the final hidden states at the positions that predict each of the N
    completion tokens (the one before each), from one teacher-forced pass over prompt and
    completion; what the LM head turns into the completion's logits and a value head into
    its values (TRL PPOTrainer's ``[:, context_length - 1 : -1]``)."""
    tokens, n = batch["tokens"], batch["completion_mask"].shape[1]
    hidden, _ = model.hidden(tokens[:, :-1], positions=batch["positions"][:, :-1],
                             segment_ids=batch["segment_ids"][:, :-1], rng=rng)
    return hidden[:, -n:]


def completion_logps(model: Any, batch: dict[str, jax.Array], rng: jax.Array | None,
                     hidden: jax.Array | None = None, *, chunk: int = 0) -> jax.Array:
    """float32 (rows, N): the policy's log-probability of each completion token (0 where masked),
    teacher-forced; ``hidden`` is :func:`completion_hidden` when the caller has it already;
    ``chunk`` > 0 computes the logits that many positions at a time (``objective.loss_chunk``)."""
    hidden = completion_hidden(model, batch, rng) if hidden is None else hidden
    n = batch["completion_mask"].shape[1]
    return hidden_token_logps(model, hidden, batch["tokens"][:, -n:], batch["completion_mask"], chunk=chunk)


def pad_id(tokenizer: Tokenizer) -> int:
    """The id prompts are left-padded with (the tokenizer's pad, else 0; never attended to)."""
    return 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)
