"""Tool-N1-7B: GRPO from Qwen2.5-7B-Instruct on xLAM + ToolACE, the paper's hyperparameters.

    python -m tooln1_jax.train --config configs/tool_n1_qwen2_5_7b.py \
        --config.data.xlam_path=/data/xlam --config.data.toolace_path=/data/toolace

Paper settings (../shared/PAPER_NOTES.md): no SFT stage; n = 5 samples per prompt; 1,024
prompts per rollout; PPO mini-batch 256 prompts (4 updates per rollout); 1 PPO epoch; 7 epochs;
AdamW lr 1e-6 constant, no warmup, betas (0.9, 0.999), weight decay 0.01, grad clip 1.0;
temperature 0.7, top_p 1, no top-k; KL k3 coefficient 1e-3 to the frozen initial model; clip
0.2; unbiased group std; token-mean loss; prompts up to 4,096 tokens, responses up to 8,192.

`distributed.enabled` starts `jax.distributed.initialize()` (auto-detected on TPU pods and
SLURM/MPI clusters); on a single host add `--config.distributed.enabled=False`.
"""

from tooln1_jax.config import default_config, validate_config


def paper_config(model: str):
    c = default_config()
    c.seed = 0
    c.output_dir = "runs/" + model.split("/")[-1].lower()
    c.distributed.enabled = True  # multi-host pod / cluster: jax.distributed.initialize

    c.model.name_or_path = model  # an HF folder, or the hub id when the hub is reachable
    c.model.dtype = "bfloat16"  # compute in bf16 ...
    c.model.param_dtype = "float32"  # ... with float32 master weights and Adam moments
    c.model.remat = "full"  # recompute each layer in the backward pass (8k-token responses)
    c.tokenizer.kind = "hf"
    c.tokenizer.name_or_path = ""  # the model's own tokenizer and chat template

    c.data.source = "mixed"  # xLAM 60k + ToolACE (single- and multi-turn), split 90/10
    c.data.xlam_path = "Salesforce/xlam-function-calling-60k"
    c.data.toolace_path = "Team-ACE/ToolACE"
    c.data.max_prompt_length = 4096
    c.data.val_fraction = 0.1

    # All devices on FSDP (weights, grads and Adam moments split over every chip).
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.rollout.num_samples = 5
    c.rollout.max_new_tokens = 8192
    c.rollout.temperature = 0.7
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    # 64 prompts x 5 samples per sampler call: a 320-row KV cache of 12k tokens (~7 GB per chip
    # on 32 chips for 7B) instead of one for all 5,120 rows.
    c.rollout.prompts_per_call = 64

    c.rl.train_batch_size = 1024
    c.rl.mini_batch_size = 256
    c.rl.micro_batch_size = 32  # sequences per accumulation chunk: 1,280 per update = 40 chunks
    c.rl.ppo_epochs = 1
    c.rl.total_epochs = 7
    c.rl.total_steps = 0
    c.rl.clip_eps = 0.2
    c.rl.kl_coef = 1e-3
    c.rl.kl_estimator = "k3"
    c.rl.entropy_coef = 0.0
    c.rl.aggregation = "token_mean"
    c.rl.reward_variant = "binary"
    c.rl.filter_zero_std_groups = False
    c.rl.unbiased_std = True
    c.rl.ref_in_bf16 = True  # the reference only runs forward passes, in bf16 compute anyway

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.01
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.grad_clip = 1.0

    c.sft.warm_start_steps = 0  # the paper has no SFT stage

    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 3
    c.log.tensorboard = True
    c.eval.every_steps = 10
    c.eval.num_examples = 512
    c.eval.max_new_tokens = 2048
    c.eval.batch_size = 128
    return c


def get_config():
    return validate_config(paper_config("Qwen/Qwen2.5-7B-Instruct"))
