"""tooln1-jax: Tool-N1 (GRPO with a rule-based tool-call reward) in pure JAX.

Modules follow the data flow: config -> data (records, prompts) -> models -> sampling ->
rollouts (rewards) -> grpo (advantages, loss) -> train_step -> bucketed_update -> checkpoint, metrics ->
run_setup -> sft -> train. Training from Python: `from tooln1_jax.train import train`.
"""

__version__ = "0.1.0"
