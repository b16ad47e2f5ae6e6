"""The base config: every key an experiment may set, with its default.

Experiments start from :func:`base_config` and change values; they never add keys, so a
typo in an experiment or on the command line is an error (the config is locked).
"""

from __future__ import annotations

import ml_collections as mlc


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = ""  # experiment name, filled in by the loader
    c.arg = ""  # the experiment's variant string, filled in by the loader

    c.model = mlc.ConfigDict(
        dict(
            name="decoder",  # registry: model.<name>
            style="llama",  # llama (RMSNorm, RoPE, SwiGLU, GQA) | gpt2 (LayerNorm, learned pos, GELU)
            vocab_size=0,  # 0: take the tokenizer's vocabulary size
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=0,  # 0: same as n_heads (no grouping)
            head_dim=0,  # 0: d_model // n_heads
            d_ff=0,  # 0: 4*d (gpt2) or the 8/3*d SwiGLU width rounded to 64 (llama)
            max_seq_len=0,  # 0: data.seq_len
            tie_embeddings=True,
            use_bias=False,
            dropout=0.0,
            rope_theta=10000.0,
            norm_eps=1e-5,
            init_std=0.02,
            dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
            remat="none",  # none | full | dots (save matmul outputs, recompute the rest)
            # Layers per iteration of the layer scan: 1 keeps compile time flat in depth;
            # n_layers unrolls fully, which XLA:CPU runs ~2x faster in the backward pass.
            scan_unroll=1,
            # --- decoder options for open-weight families (lmstack.interop.hf imports them) ---
            qkv_bias=False,  # biases on the q/k/v projections only (Qwen2)
            rope_scaling="",  # "" | llama3 (Llama 3.1 frequency scaling, HF rope_scaling fields below)
            rope_scaling_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position_embeddings=8192,
            sliding_window=0,  # decoder: 0 = full causal attention; else keys within this many positions (Mistral)
            # --- encoder, encoder_decoder and two_tower (the decoder ignores these keys but activation) ---
            # "": from the family/style (encoder: llama -> rope, gpt2 -> learned; encoder_decoder:
            # relative) | learned | rope | relative (T5 buckets; encoder_decoder: relative | rope)
            positions="",
            norm="",  # "": from style (llama -> rmsnorm, gpt2 -> layernorm) | rmsnorm | layernorm
            norm_position="pre",  # pre | post (BERT; encoder and two_tower only)
            # all families: "": from style (llama -> swiglu, gpt2 -> gelu) | swiglu | geglu | gelu | relu | gelu_tanh
            activation="",
            relpos_buckets=32,  # T5 relative position buckets (positions=relative)
            relpos_max_distance=128,  # distances beyond this share the last bucket
            type_vocab_size=0,  # token-type embeddings (BERT: 2); 0: none
            mlm_transform=False,  # BERT MLM head: dense + GELU + norm before the tied output
            pooler=False,  # BERT pooler: dense + tanh on the pooled vector
            pooling="mean",  # how a sequence becomes one vector: mean | cls | last
            n_encoder_layers=0,  # encoder_decoder: 0 means n_layers
            n_decoder_layers=0,  # encoder_decoder: 0 means n_layers
            share_embeddings=True,  # encoder_decoder: one token table for encoder and decoder
            share_towers=True,  # two_tower: one encoder for both towers (each has its own projection)
            projection_dim=0,  # two_tower: output width of each tower's projection; 0 means d_model
            logit_scale_init=2.659260036932778,  # two_tower: log similarity scale for the loss, log(1/0.07) (CLIP)
            logit_bias_init=-10.0,  # two_tower: similarity bias for the sigmoid loss (SigLIP)
        )
    )
    c.data = mlc.ConfigDict(
        dict(
            source="stdlib",  # stdlib | text | jsonl
            path="",  # file, directory or glob for text/jsonl sources
            field="text",  # JSONL field holding the text
            query_field="query",  # pairs_jsonl: the query, the document and (optional) group fields
            doc_field="document",
            group_field="",
            max_chars=0,  # 0: no limit; otherwise cut the corpus to this many characters
            seq_len=128,
            val_fraction=0.1,  # the last fraction of the token stream is held out
            seed=0,
            tokenizer=mlc.ConfigDict(
                dict(
                    kind="sentencepiece",  # sentencepiece | byte | char
                    path="",  # a trained SentencePiece model; empty: train one and cache it
                    vocab_size=4096,
                    model_type="bpe",  # SentencePiece model type when training: bpe | unigram
                    max_train_chars=4_000_000,
                )
            ),
        )
    )
    c.objective = mlc.ConfigDict(
        dict(
            name="causal_lm",  # registry: objective.<name>
            loss="infonce",  # contrastive: infonce (in-batch softmax) | sigmoid (SigLIP)
            hard_negatives=0,  # contrastive: extra same-group documents per query
            # span_corruption / ul2 (T5): sentinels are the top ids of model.vocab_size
            noise_density=0.15,
            mean_span_length=3.0,
            num_sentinels=100,
            targets_length=0,  # seq2seq decoder length; 0: derived (span_corruption) or data.seq_len
            # ul2: rates of the R, X (dense), X (long spans) and S denoisers; mode tokens sit below the sentinels
            mixing_rates=(0.4, 0.2, 0.2, 0.2),
            # mlm (BERT): the [MASK] id is the top id of model.vocab_size
            select_rate=0.15,
            mask_rate=0.8,
            random_rate=0.1,
            whole_word=False,
            # denoising (BART): infilling | permutation | both
            denoise="both",
            mask_ratio=0.3,
            poisson_lambda=3.0,
            # prefix_lm: the prefix length is uniform in [min, max] x seq_len for training
            prefix_min=0.1,
            prefix_max=0.9,
        )
    )
    c.optimizer = mlc.ConfigDict(
        dict(
            lr=1e-3,
            min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio
            schedule="cosine",  # cosine | linear | constant (all after linear warmup)
            warmup_steps=100,
            decay_steps=0,  # 0: train.steps
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_embeddings=False,
            clip_norm=1.0,  # 0: no clipping
        )
    )
    c.train = mlc.ConfigDict(
        dict(
            steps=1000,
            batch_size=32,  # global batch, in sequences
            microbatches=1,  # gradient accumulation: the batch is split into this many
            seed=0,
            log_every=10,
            progress=True,
        )
    )
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
    c.checkpoint = mlc.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.eval = mlc.ConfigDict(
        dict(
            every=500,  # 0: only at the end
            batches=20,  # validation batches per evaluation (0: the whole split)
            batch_size=0,  # 0: train.batch_size
            names=("perplexity",),  # registered evaluators to run (eval.NAME)
        )
    )
    c.sample = mlc.ConfigDict(
        dict(prompt="", max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95, seed=0)
    )
    c.init = mlc.ConfigDict(dict(**{"from": "scratch"}))
    c.peft = mlc.ConfigDict(dict(method="none"))
    c.log = mlc.ConfigDict(dict(jsonl=True, tensorboard=True))
    return c
