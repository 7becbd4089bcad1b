"""tooln1-jax: Tool-N1 (GRPO with a rule-based tool-call reward) in pure JAX.

Modules follow the data flow: config -> data/prompt -> models -> sampling ->
rewards -> grpo (advantages, loss) -> train_step -> checkpoint/logs -> train.
"""

__version__ = "0.1.0"


def train(config):
    """Runs GRPO training for an ml_collections config (see configs/). Returns the run summary."""
    from tooln1_jax.train import train as _train

    return _train(config)
