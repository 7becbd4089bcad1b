"""The default demo: a tiny random Qwen2 on synthetic tool calls, SFT warm start, then GRPO.

    python -m tooln1_jax.train                      # this config (the default)
    python -m tooln1_jax.train --config configs/tiny_cpu.py --config.rl.total_steps=10

Held-out exact-call accuracy (greedy, binary reward) is measured after the SFT warm start and
after GRPO; the run prints both, and writes metrics.jsonl, summary.json and the reward curve
PNG under output_dir. The whole run is sized for a 2-core CPU in at most 15 minutes.

Intended mechanism: the SFT warm start is stopped early, when the model already writes the
answer format but gets the exact call right only part of the time; sampling at temperature
1.0 then gives groups with both right and wrong answers, which is what GRPO learns from. A
tiny model needs a far larger RL learning rate than the paper's 1e-6. Two tools per prompt
(one target, a look-alike distractor most of the time) and the tiny tokenizer's phrase
tokens keep prompts near 110 tokens; the ~13% over 128 are dropped (counted), so every
rollout pads to 128. `benchmarks/demo_control.py` spends the GRPO phase's compute on more
SFT instead, for comparison.

Its measured results are in the README (and their history in docs/performance_history.md).
"""

from tooln1_jax.config import default_config, validate_config


def get_config():
    c = default_config()
    c.seed = 0
    c.output_dir = "runs/tiny_cpu"

    c.model.random.update(
        dict(
            model_type="qwen2",
            vocab_size=0,
            hidden_size=192,
            intermediate_size=512,
            num_layers=2,
            num_heads=6,
            num_kv_heads=6,
            head_dim=32,
            tie_word_embeddings=True,
            max_position_embeddings=512,
        )
    )
    c.tokenizer.kind = "tiny"
    c.tokenizer.vocab_size = 1536

    c.data.source = "synthetic"
    c.data.max_prompt_length = 128
    c.data.val_fraction = 0.1
    c.data.synthetic = dict(
        num_examples=4000,
        seed=0,
        num_tools=2,
        min_calls=1,
        max_calls=1,
        arg_types=("string", "enum", "integer", "boolean"),
        similar_distractor_prob=0.7,
        optional_prob=0.3,
        distinct_tools=True,
    )

    c.sft.warm_start_steps = 1000
    c.sft.lr = 2e-3
    c.sft.batch_size = 16
    c.sft.warmup_steps = 10
    c.sft.max_completion_length = 40
    c.sft.log_every = 50

    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 40
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0

    c.rl.train_batch_size = 16
    c.rl.mini_batch_size = 8
    c.rl.ppo_epochs = 1
    c.rl.total_steps = 80
    c.rl.kl_coef = 0.0
    c.rl.reward_variant = "binary"

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0

    c.checkpoint.every_steps = 0
    c.log.progress_bar = True
    c.log.plot = True
    c.eval.at_start = True  # after the SFT warm start
    c.eval.at_end = True
    c.eval.every_steps = 20
    c.eval.num_examples = 200
    c.eval.max_new_tokens = 40
    c.eval.batch_size = 100
    return validate_config(c)
