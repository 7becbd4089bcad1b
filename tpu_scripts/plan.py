"""The pod plan for the paper's 7B and 14B runs, computed: memory per chip, mesh, step time.

    python tpu_scripts/plan.py                              # prints the tables
    python tpu_scripts/plan.py --update-doc docs/pod_plan.md  # rewrites them between the doc's markers
    python tpu_scripts/plan.py --colab                        # the LoRA notebook's Colab settings
    python tpu_scripts/plan.py --attention dense              # the tables with dense (quadratic) attention

Per-chip sizes come from the project's own sharding rules (`tooln1_jax.sharding`: TRAIN_RULES
for the update, SAMPLE_RULES for the rollout) applied to the real parameter and KV-cache shapes
on an abstract (data, fsdp, tensor) mesh, so a dimension the mesh does not divide stays
replicated here exactly as it would on the pod. Times are FLOPs / (chips x peak x MFU) for
the dense passes and bytes / (HBM bandwidth x efficiency) for decode steps; the assumed
efficiencies are fields of `Efficiency`. A plan with `lora_rank` > 0 trains LoRA adapters on a
frozen bfloat16 base (`tooln1_jax/models/lora.py`, all seven targets), placed by the same rules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import parse_accelerator  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from tooln1_jax.models import attention  # noqa: E402
from tooln1_jax.models.kv_cache import VALUE_CACHE_LOGICAL_AXES  # noqa: E402
from tooln1_jax.models.lora import adapter_logical_axes, adapter_shapes  # noqa: E402
from tooln1_jax.models.model_config import ModelConfig, preset  # noqa: E402
from tooln1_jax.models.params import param_logical_axes, param_shapes  # noqa: E402
from tooln1_jax.settings import LoraSettings  # noqa: E402
from tooln1_jax.sharding import MESH_AXES, SAMPLE_RULES, TRAIN_RULES, ShardingRules, logical_to_spec  # noqa: E402

GiB = 2**30
F32, BF16 = 4, 2


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (bf16 peak, HBM capacity in bytes, HBM bandwidth in bytes/s), and
    the JAX backend and compute dtype that `attention.resolve` sees there."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str
    backend: str = "tpu"
    compute_dtype: str = "bfloat16"
    gpu_capability: float | None = None  # CUDA compute capability, for a GPU


CHIPS = {
    "v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("TPU v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("TPU v5p", 459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("TPU v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# Colab's accelerators, per JAX device (a TPU v2-8 shows 8 devices, one per TensorCore: half a
# chip each), for notebooks/lora_grpo.ipynb. A T4 has no bfloat16: it computes in float16, the
# same 2 bytes per value.
COLAB_DEVICES = {
    "colab-tpu-v2-8": (ChipSpec("TPU v2 core", 22.5e12, 8 * GiB, 300e9, "https://cloud.google.com/tpu/docs/v2"), 8),
    "colab-t4": (
        ChipSpec(
            "NVIDIA T4", 65e12, 16e9, 320e9, "https://www.nvidia.com/en-us/data-center/tesla-t4/", "gpu", "float16", 7.5
        ),
        1,
    ),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One paper step (a rollout batch and its updates). Lengths are the padded shapes."""

    prompts: int = 1024  # prompts per rollout batch
    samples: int = 5  # GRPO group size
    mini_batch_prompts: int = 256  # prompts per optimizer update (4 updates per step)
    steps: int = 140  # rollout steps in the run
    prompt_len: int = 4096  # prompt bucket (sampler pads prompts to a power of two, at most this)
    max_new_tokens: int = 8192  # decode budget: the KV cache holds prompt_len + max_new_tokens
    decode_steps: int = 8192  # decode iterations actually run (the loop stops when every row stopped)
    train_len: int = 4096 + 8192  # tokens per sequence in the log-prob passes and the update

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


CEILING = Workload()
# Illustrative, not measured: prompts fit the 2,048 bucket and the longest response of a pass is
# 2,048 tokens. An update on completions padded to max_new_tokens would see 2,048 + 8,192 tokens ...
TYPICAL = Workload(prompt_len=2048, decode_steps=2048, train_len=2048 + 8192)
# ... the trainer cuts each micro-batch to the buckets of its own rows (bucketed_update): at most 2,048
# completion columns here (this plan counts every micro-batch at the longest).
TRIMMED = Workload(prompt_len=2048, decode_steps=2048, train_len=2048 + 2048)
SCENARIOS = (("ceiling", CEILING), ("typical", TYPICAL), ("typical, trimmed", TRIMMED))
# A notebook's run: 8 prompts x 4 samples per step, two updates, prompts up to 1,024 tokens and
# answers up to 512 (a tool call with its reasoning fits), 100 steps.
NOTEBOOK = Workload(
    prompts=8,
    samples=4,
    mini_batch_prompts=4,
    steps=100,
    prompt_len=1024,
    max_new_tokens=512,
    decode_steps=512,
    train_len=1536,
)


@dataclasses.dataclass(frozen=True)
class Efficiency:
    mfu: float = 0.40  # of peak bf16 FLOP/s, for the dense passes (update, log-probs, prefill)
    hbm_efficiency: float = 0.70  # of HBM bandwidth, for a decode step
    usable_hbm: float = 0.90  # of HBM capacity; the rest is XLA's runtime reserve and fragmentation


@dataclasses.dataclass(frozen=True)
class PodPlan:
    name: str
    model: str  # a PRESETS id
    accelerator: str  # gcloud accelerator type, e.g. "v5p-64"
    mesh: tuple  # (data, fsdp, tensor), config.mesh.*
    micro_batch: int  # sequences per gradient-accumulation chunk, config.rl.micro_batch_size
    generation_prompts: int  # prompts per rollout generation pass (x samples rows each)
    logprob_chunk: int = 128  # positions per log-prob chunk (grpo.token_logprobs chunk_size)
    lora_rank: int = 0  # > 0: LoRA of this rank on every target, the base frozen in bf16
    # config.model.attention_impl; "auto" is what `attention.resolve` picks on the chip ("splash" on TPU).
    # "dense" prints the quadratic score figures (`python tpu_scripts/plan.py --attention dense`).
    attention_impl: str = "auto"

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank)


# Today the trainer samples the whole rollout batch (1,024 prompts) in one sampler call; the
# plans below with fewer prompts per pass need it to sample in passes (see docs/pod_plan.md).
PLANS = (
    PodPlan("7B on v5p-64", "Qwen/Qwen2.5-7B-Instruct", "v5p-64", (1, 8, 4), micro_batch=8, generation_prompts=512),
    PodPlan("7B on v4-64", "Qwen/Qwen2.5-7B-Instruct", "v4-64", (1, 8, 4), micro_batch=8, generation_prompts=128),
    PodPlan("7B on v6e-64", "Qwen/Qwen2.5-7B-Instruct", "v6e-64", (1, 16, 4), micro_batch=16, generation_prompts=256),
    PodPlan("14B on v5p-128", "Qwen/Qwen2.5-14B-Instruct", "v5p-128", (1, 8, 8), micro_batch=8, generation_prompts=256),
    # One pass of all 1,024 prompts, as the trainer samples today: it takes a 4x bigger slice.
    PodPlan(
        "7B on v5p-256, one pass",
        "Qwen/Qwen2.5-7B-Instruct",
        "v5p-256",
        (1, 32, 4),
        micro_batch=32,
        generation_prompts=1024,
    ),
    PodPlan(
        "14B on v5p-512, one pass",
        "Qwen/Qwen2.5-14B-Instruct",
        "v5p-512",
        (1, 32, 8),
        micro_batch=32,
        generation_prompts=1024,
    ),
)
# Shown to fail by the same arithmetic: 16 GB chips cannot hold 14B training state on 16 chips.
COUNTER_EXAMPLE = PodPlan(
    "14B on v5litepod-16", "Qwen/Qwen2.5-14B-Instruct", "v5litepod-16", (1, 4, 4), micro_batch=4, generation_prompts=16
)


# LoRA on small slices (the question: does 7B fit a v5e-8 or a v4-8, 14B a v5p-8?), at the
# paper's workload. Rank 16 on all seven targets; the base is the frozen bf16 weights and the
# reference at once. The tensor axis is 4 (Qwen2.5-7B's 4 KV heads and 28 query heads divide it; 8 does not).
LORA_RANK = 16
LORA_PLANS = (
    PodPlan(
        "7B LoRA on v5litepod-8",
        "Qwen/Qwen2.5-7B-Instruct",
        "v5litepod-8",
        (1, 2, 4),
        micro_batch=2,
        generation_prompts=8,
        lora_rank=LORA_RANK,
    ),
    PodPlan(
        "7B LoRA on v4-8",
        "Qwen/Qwen2.5-7B-Instruct",
        "v4-8",
        (1, 1, 4),
        micro_batch=1,
        generation_prompts=16,
        lora_rank=LORA_RANK,
    ),
    PodPlan(
        "14B LoRA on v5p-8",
        "Qwen/Qwen2.5-14B-Instruct",
        "v5p-8",
        (1, 1, 4),
        micro_batch=1,
        generation_prompts=16,
        lora_rank=LORA_RANK,
    ),
)

# The notebook's settings (notebooks/lora_grpo.ipynb): Qwen2.5-1.5B-Instruct with rank-16 LoRA
# on Colab's TPU v2-8 (its 2 KV heads allow tensor = 2) and on a T4, at the NOTEBOOK workload.
COLAB_PLANS = (
    PodPlan(
        "Qwen2.5-1.5B LoRA, Colab TPU v2-8",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "colab-tpu-v2-8",
        (1, 4, 2),
        micro_batch=4,
        generation_prompts=8,
        lora_rank=LORA_RANK,
    ),
    PodPlan(
        "Qwen2.5-1.5B LoRA, Colab T4",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "colab-t4",
        (1, 1, 1),
        micro_batch=2,
        generation_prompts=8,
        lora_rank=LORA_RANK,
    ),
)


# ----------------------------------------------------------------------------- sharding


def abstract_mesh(mesh: tuple) -> AbstractMesh:
    return AbstractMesh(tuple(mesh), MESH_AXES)


def split_factor(logical_axes, shape, mesh: AbstractMesh, rules: ShardingRules) -> int:
    """How many ways the project's rules split an array of `shape` on `mesh`."""
    spec = logical_to_spec(logical_axes, mesh, rules, shape)
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh.shape[a] for a in axes)


def param_bytes_per_chip(
    config: ModelConfig, mesh: AbstractMesh, rules: ShardingRules, bytes_per_value: int, decode_copy: bool = False
) -> float:
    """All params; with `decode_copy`, only what `group_decode.decode_weights` copies (the layers,
    and an untied LM head; a tied head is the embedding itself)."""
    shapes, axes = param_shapes(config), param_logical_axes(config)
    top = ("lm_head",) if decode_copy else tuple(k for k in shapes if k != "layers")
    leaves = [(shapes[k], axes[k]) for k in top if k in shapes]
    leaves += [(shapes["layers"][k], axes["layers"][k]) for k in shapes["layers"]]
    return sum(math.prod(s) / split_factor(a, s, mesh, rules) * bytes_per_value for s, a in leaves)


def adapter_bytes_per_chip(config: ModelConfig, lora: LoraSettings, mesh: AbstractMesh, rules: ShardingRules) -> float:
    """The float32 LoRA adapters (A and B of every target and layer), split as `lora.py` places them."""
    shapes, axes = adapter_shapes(config, lora)["layers"], adapter_logical_axes(lora)["layers"]
    leaves = [(shapes[t][m], axes[t][m]) for t in shapes for m in ("a", "b")]
    return sum(math.prod(s) / split_factor(a, s, mesh, rules) * F32 for s, a in leaves)


def adapter_matmul_params(config: ModelConfig, lora: LoraSettings) -> int:
    """Adapter parameters, all of which take part in a matmul per token."""
    return sum(math.prod(s) for t in adapter_shapes(config, lora)["layers"].values() for s in t.values())


def kv_cache_bytes_per_chip(config: ModelConfig, mesh: AbstractMesh, rows: int, length: int) -> float:
    """K and V, every layer, [rows, kv_heads, length, head_dim] bf16 (keys store the last two
    transposed: the same bytes and split), under SAMPLE_RULES."""
    shape = (rows, config.num_kv_heads, length, config.head_dim)
    per_layer = 2 * math.prod(shape) * BF16 / split_factor(VALUE_CACHE_LOGICAL_AXES, shape, mesh, SAMPLE_RULES)
    return config.num_layers * per_layer


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Report:
    plan: PodPlan
    chips: int
    chip: ChipSpec
    budget_bytes: float
    persistent: dict  # name -> bytes per chip, held for the whole run
    update: dict  # name -> bytes per chip, live during the update on top of `persistent`
    rollout: dict  # name -> bytes per chip, live during generation on top of `persistent`
    times: dict  # scenario name -> {phase: seconds}

    @property
    def update_peak(self) -> float:
        return sum(self.persistent.values()) + sum(self.update.values())

    @property
    def rollout_peak(self) -> float:
        return sum(self.persistent.values()) + sum(self.rollout.values())

    @property
    def fits(self) -> bool:
        return max(self.update_peak, self.rollout_peak) <= self.budget_bytes


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding table
    (a lookup), unless it is tied to the output head."""
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_params - embed


def attention_flops_per_token(config: ModelConfig, context: int) -> float:
    """Forward QK^T and PV for one query over `context` keys, all layers. The full context counts:
    "dense" and "blockwise" compute every masked score of the [T, S] matrix (blockwise changes the
    memory, not the FLOPs). The splash kernel skips key blocks that the causal mask hides entirely
    (about half of them in training), which this plan does not model: on TPU the attention FLOPs
    here are an upper bound."""
    return 4 * config.num_layers * context * config.num_heads * config.head_dim


def attention_memory(impl: str, cfg: ModelConfig, rows: int, t: int, split: int, backward: bool) -> dict:
    """Bytes per chip of one layer's attention over `t` queries and `t` keys (training, or a prefill
    into its prompt-length cache), by item: what a layer holds on top of its inputs and outputs.
    `split` is how many ways (batch, KV heads) divide; `backward`: the update's recompute (scores,
    probabilities and their gradient live) rather than a forward (scores and probabilities).

    - "dense" materialises the float32 scores [rows, heads, t, t] (x3 backward, x2 forward):
      quadratic in t.
    - "blockwise" holds one key block at a time, [rows, heads, t, BLOCK] float32 (x3 / x2 as
      dense), its float32 output (forward) or dq (backward) accumulator [rows, heads, t, head_dim],
      and the per-row softmax max and sum [rows, heads, t] float32 that its backward recomputes
      the blocks from: linear in t.
    - "splash" / "cudnn" (flash kernels) keep their score tiles on chip (splash: SPLASH_BLOCK x
      SPLASH_BLOCK float32 tiles in VMEM, one grid step at a time; cuDNN: shared memory), so HBM
      holds only the per-row statistics the backward needs: the logsumexp saved by the forward and
      the row sum of dO * O, [rows, heads, t] float32 each. A forward without residuals (the
      prefill) holds nothing beyond its output."""
    n = 3 if backward else 2
    per_row = rows * cfg.num_heads * t * F32 / split  # one float32 per query row and head
    if impl == "dense":
        name = (
            "attention scores, one layer (x3, fp32)" if backward else "prefill attention scores, one layer (x2, fp32)"
        )
        return {name: n * per_row * t}
    prefix = "attention" if backward else "prefill attention"
    if impl == "blockwise":
        return {
            f"{prefix} score blocks, one layer (x{n}, [T, {attention.BLOCK}] fp32)": n
            * per_row
            * min(attention.BLOCK, t),
            f"{prefix} fp32 accumulator, one layer": per_row * cfg.head_dim,
            f"{prefix} softmax max and sum, one layer (fp32)": 2 * per_row,
        }
    if impl in ("splash", "cudnn"):
        if not backward:
            return {f"{prefix}, one layer ({impl}: score tiles on chip)": 0.0}
        return {f"{prefix} logsumexp and dO.O rows, one layer ({impl}, fp32)": 2 * per_row}
    raise ValueError(f"attention_impl={impl!r}: unknown")


def devices_of(accelerator: str) -> tuple[ChipSpec, int]:
    """(the spec of one device, the device count) of a gcloud accelerator type or a COLAB_DEVICES name."""
    if accelerator in COLAB_DEVICES:
        return COLAB_DEVICES[accelerator]
    accel = parse_accelerator(accelerator)
    return CHIPS[accel.generation], accel.chips


def plan_report(
    plan: PodPlan, scenarios=SCENARIOS, eff: Efficiency = Efficiency(), workload: Workload = CEILING
) -> Report:
    """Memory per device for `workload`'s padded shapes, and step times for each scenario."""
    chip, chips = devices_of(plan.accelerator)
    if math.prod(plan.mesh) != chips:
        raise ValueError(
            f"{plan.name}: mesh {plan.mesh} has {math.prod(plan.mesh)} devices, {plan.accelerator} has {chips} chips"
        )
    cfg = preset(plan.model)
    mesh = abstract_mesh(plan.mesh)
    w = workload  # memory is sized for the padded shapes, which do not shrink with shorter text
    d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    s = w.train_len
    mb = plan.micro_batch

    def split(logical, shape, rules=TRAIN_RULES):
        return split_factor(logical, shape, mesh, rules)

    persistent, gradients = _training_state(cfg, plan, mesh)
    batch_split = split(("batch", "seq", "embed"), (mb, s, d))
    head_split = split(("batch", "kv_heads", None, None), (mb, cfg.num_kv_heads, s, s))
    impl = attention.resolve(plan.attention_impl, chip.compute_dtype, s, chip.backend, chip.gpu_capability)
    update = {
        **gradients,
        # remat="full" keeps each layer's input [mb, S, D] (bf16) and recomputes the rest.
        "saved layer inputs (remat)": L * mb * s * d * BF16 / batch_split,
        # One layer recomputed in the backward pass, split over batch and (KV-head-divisible) tensor.
        **attention_memory(impl, cfg, mb, s, head_split, backward=True),
        "MLP activations, one layer (x4, bf16)": 4 * mb * s * f * BF16 / split(("batch", "seq", "mlp"), (mb, s, f)),
        "log-prob chunk logits (x3, fp32)": 3
        * mb
        * plan.logprob_chunk
        * v
        * F32
        / split(("batch", "seq", "vocab"), (mb, plan.logprob_chunk, v)),
    }
    rows = plan.generation_prompts * w.samples
    cache_len = w.prompt_len + w.max_new_tokens
    gp, p = plan.generation_prompts, w.prompt_len
    # The prefill runs the same attention over its prompt-length cache (sampling._prefill).
    prefill_impl = attention.resolve(plan.attention_impl, chip.compute_dtype, p, chip.backend, chip.gpu_capability)
    prefill_split = split(("batch", "kv_heads", None, None), (gp, cfg.num_kv_heads, p, p), SAMPLE_RULES)
    # sampling.sampling_params: the params cast to the compute dtype and placed tensor-parallel
    # by one program, once per rollout (bf16 compute: a bf16 copy, no fp32 one).
    sampling = (
        "sampling weights (bf16 copy, tensor-parallel)"
        if not plan.lora_rank
        else "sampling weights (bf16 base + adapters merged once per rollout, tensor-parallel)"
    )
    rollout = {
        sampling: param_bytes_per_chip(cfg, mesh, SAMPLE_RULES, BF16),
        # group_decode.decode_weights: per-layer slices in the compute dtype (bf16), q/k/v
        # and gate/up fused, [out, in], built once before the decode loop, which reads them.
        "decode weights (bf16 layers + untied head, built once per rollout)": param_bytes_per_chip(
            cfg, mesh, SAMPLE_RULES, BF16, decode_copy=True
        ),
        f"KV cache, {rows} rows x {cache_len} (bf16)": kv_cache_bytes_per_chip(cfg, mesh, rows, cache_len),
        f"prompt KV cache before the group copy ({gp} rows)": kv_cache_bytes_per_chip(cfg, mesh, gp, cache_len),
        **attention_memory(prefill_impl, cfg, gp, p, prefill_split, backward=False),
        "decode logits (fp32)": rows * v * F32 / split(("batch", "vocab"), (rows, v), SAMPLE_RULES),
    }
    times = {name: step_times(cfg, plan, chip, chips, mesh, rollout, sc, eff) for name, sc in scenarios}
    return Report(plan, chips, chip, eff.usable_hbm * chip.hbm_bytes, persistent, update, rollout, times)


def _training_state(cfg: ModelConfig, plan: PodPlan, mesh: AbstractMesh) -> tuple[dict, dict]:
    """(bytes per chip held for the whole run, gradient bytes live in the update), by item."""
    if plan.lora_rank:
        adapters = adapter_bytes_per_chip(cfg, plan.lora, mesh, TRAIN_RULES)
        held = {
            "frozen base (bf16; also the reference)": param_bytes_per_chip(cfg, mesh, TRAIN_RULES, BF16),
            f"LoRA adapters, rank {plan.lora_rank} (fp32)": adapters,
            "AdamW m and v of the adapters (fp32)": 2 * adapters,
        }
        return held, {"adapter gradients (fp32 accumulator + micro-batch)": 2 * adapters}
    # The float32 master copy is needed: at lr 1e-6 an update is ~1e-6 of a weight, far below
    # bfloat16's 2^-8 relative spacing, so bf16 weights would not change at all.
    master = param_bytes_per_chip(cfg, mesh, TRAIN_RULES, F32)
    held = {
        "policy params (fp32 master)": master,
        "AdamW m and v (fp32)": 2 * master,
        "reference model (bf16)": param_bytes_per_chip(cfg, mesh, TRAIN_RULES, BF16),
    }
    return held, {"gradients (fp32 accumulator + micro-batch)": 2 * master}


def step_times(cfg, plan, chip, chips, mesh, rollout_mem, w: Workload, eff: Efficiency) -> dict:
    """Seconds per rollout step, by phase."""
    n = matmul_params(cfg)
    dense = chips * chip.peak_flops * eff.mfu  # FLOP/s of the whole slice on dense passes
    tokens = w.rows * w.train_len
    attn = attention_flops_per_token(cfg, w.train_len)
    # reference log-probs: one forward (inside the update step). The old-policy log-probs are
    # the sampler's own, so they cost no pass.
    logprob_flops = (2 * n + attn) * tokens
    # policy forward + backward (6N) plus the remat recompute of the forward (2N); attention
    # likewise 1 + 2 + 1 forward-equivalents. LoRA: the frozen base's backward computes input
    # gradients only (2N, no weight gradients), the adapters (Na) 2 + 2 forward-equivalents + 4 backward.
    if plan.lora_rank:
        update_flops = (6 * n + 8 * adapter_matmul_params(cfg, plan.lora) + 4 * attn) * tokens
    else:
        update_flops = (8 * n + 4 * attn) * tokens

    passes = math.ceil(w.prompts / plan.generation_prompts)
    rows = plan.generation_prompts * w.samples
    cache_len = w.prompt_len + w.max_new_tokens
    prefill_flops = (2 * n + attention_flops_per_token(cfg, w.prompt_len)) * plan.generation_prompts * w.prompt_len
    # A decode step reads this chip's weight shard and its whole allocated cache slice (the
    # attention runs over the full cache length), and does 2N + attention FLOPs per row.
    weights = next(b for k, b in rollout_mem.items() if k.startswith("sampling weights"))
    step_bytes = weights + kv_cache_bytes_per_chip(cfg, mesh, rows, cache_len)
    step_flops = (2 * n + attention_flops_per_token(cfg, cache_len)) * rows / chips
    decode_step = max(step_bytes / (chip.hbm_bandwidth * eff.hbm_efficiency), step_flops / (chip.peak_flops * eff.mfu))
    generation = passes * (prefill_flops / dense + w.decode_steps * decode_step)
    t = {
        "generation": generation,
        "decode step (ms)": decode_step * 1e3,
        "reference log-probs": logprob_flops / dense,
        "policy update": update_flops / dense,
    }
    t["step"] = t["generation"] + t["reference log-probs"] + t["policy update"]
    t["run (h)"] = t["step"] * w.steps / 3600
    return t


def largest_generation_prompts(plan: PodPlan) -> int:
    """The largest power-of-two generation batch (prompts per pass) whose rollout fits, or 0."""
    gp = CEILING.prompts
    while gp >= 1:
        r = plan_report(dataclasses.replace(plan, generation_prompts=gp), scenarios=())
        if r.rollout_peak <= r.budget_bytes:
            return gp
        gp //= 2
    return 0


# ----------------------------------------------------------------------------- tables


def _gib(b: float) -> str:
    return f"{b / GiB:,.2f}"


def render(reports) -> str:
    """The markdown tables of docs/pod_plan.md (between its plan:begin / plan:end markers)."""
    out = [
        "| plan | chips | mesh (data, fsdp, tensor) | micro-batch | generation passes (largest fitting) "
        "| update peak GiB | rollout peak GiB | usable GiB | fits | step s: ceiling / typical / trimmed "
        "| 140 steps h: ceiling / typical / trimmed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        passes = math.ceil(CEILING.prompts / r.plan.generation_prompts)
        c, t, tr = (r.times[k] for k, _ in SCENARIOS)
        out.append(
            f"| {r.plan.name} | {r.chips} x {r.chip.name} | {r.plan.mesh} | {r.plan.micro_batch} | "
            f"{passes} x {r.plan.generation_prompts} prompts ({largest_generation_prompts(r.plan)}) | "
            f"{_gib(r.update_peak)} | {_gib(r.rollout_peak)} | {_gib(r.budget_bytes)} | "
            f"{'yes' if r.fits else '**no**'} | "
            f"{c['step']:,.0f} / {t['step']:,.0f} / {tr['step']:,.0f} | "
            f"{c['run (h)']:,.1f} / {t['run (h)']:,.1f} / {tr['run (h)']:,.1f} |"
        )
    out += ["", "### What the attention kernel frees per chip", "", render_attention(reports)]
    for r in reports:
        cfg = preset(r.plan.model)
        out += [
            "",
            f"### {r.plan.name}: memory per chip (GiB)",
            "",
            f"{r.plan.model}: {cfg.num_params:,} parameters ({matmul_params(cfg):,} in matmuls), "
            f"{cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads of {cfg.head_dim}. "
            f"Mesh {dict(zip(MESH_AXES, r.plan.mesh))} on {r.plan.accelerator}.",
            "",
            "| phase | item | GiB per chip |",
            "|---|---|---|",
        ]
        for phase, items in (("held", r.persistent), ("update", r.update), ("rollout", r.rollout)):
            out += [f"| {phase} | {k} | {_gib(b)} |" for k, b in items.items()]
        out.append(f"| | **update peak** (held + update) | **{_gib(r.update_peak)}** |")
        out.append(f"| | **rollout peak** (held + rollout) | **{_gib(r.rollout_peak)}** |")
        out.append(
            f"| | usable HBM ({Efficiency().usable_hbm:.0%} of {_gib(r.chip.hbm_bytes)}) | {_gib(r.budget_bytes)} |"
        )
        out += [
            "",
            f"Step time on {r.plan.accelerator} (seconds unless marked):",
            "",
            "| scenario | decode step (ms) | generation | reference log-probs | policy update | step | 140 steps (h) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, t in r.times.items():
            out.append(
                f"| {name} | {t['decode step (ms)']:,.1f} | {t['generation']:,.0f} | {t['reference log-probs']:,.0f} | "
                f"{t['policy update']:,.0f} | {t['step']:,.0f} | {t['run (h)']:,.1f} |"
            )
    return "\n".join(out)


def render_attention(reports) -> str:
    """Per chip, what the attention kernel frees: each plan's layer-local attention memory with
    "dense" (the quadratic scores) and with the implementation it resolves to, and both peaks."""
    out = [
        "| plan | attention | update: dense scores GiB | update: kernel MiB | freed GiB "
        "| prefill: dense scores GiB | prefill: kernel MiB | freed GiB "
        "| update peak GiB: dense / kernel | rollout peak GiB: dense / kernel | usable GiB "
        "| fits at this batch: dense / kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        d = plan_report(dataclasses.replace(r.plan, attention_impl="dense"), scenarios=())
        impl = attention.resolve(
            r.plan.attention_impl, r.chip.compute_dtype, CEILING.train_len, r.chip.backend, r.chip.gpu_capability
        )
        upd, pre = (_attention_items(x.update) for x in (d, r)), (_attention_items(x.rollout) for x in (d, r))
        (ud, uk), (pd, pk) = upd, pre
        out.append(
            f"| {r.plan.name} | {impl} | {_gib(ud)} | {uk / 2**20:,.2f} | {_gib(ud - uk)} | "
            f"{_gib(pd)} | {pk / 2**20:,.2f} | "
            f"{_gib(pd - pk)} | {_gib(d.update_peak)} / {_gib(r.update_peak)} | "
            f"{_gib(d.rollout_peak)} / {_gib(r.rollout_peak)} | {_gib(r.budget_bytes)} | "
            f"{'yes' if d.fits else 'no'} / {'yes' if r.fits else 'no'} |"
        )
    return "\n".join(out)


def _attention_items(items: dict) -> float:
    return sum(b for k, b in items.items() if "attention" in k)


def colab_report(plan: PodPlan) -> Report:
    """A COLAB_PLANS entry's memory per device and step time at the NOTEBOOK workload."""
    return plan_report(plan, scenarios=(("notebook", NOTEBOOK),), workload=NOTEBOOK)


def render_colab(reports) -> str:
    """The notebook's table: per device, each memory item, the peaks, and the step time."""
    out = [
        "| setting | devices | mesh (data, fsdp, tensor) | micro-batch | update peak GiB | rollout peak GiB "
        "| usable GiB | fits | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        out.append(
            f"| {r.plan.name} | {r.chips} x {r.chip.name} | {r.plan.mesh} | {r.plan.micro_batch} | "
            f"{_gib(r.update_peak)} | {_gib(r.rollout_peak)} | {_gib(r.budget_bytes)} | "
            f"{'yes' if r.fits else '**no**'} | {r.times['notebook']['step']:,.1f} |"
        )
    for r in reports:
        out += ["", f"{r.plan.name}, GiB per device:", "", "| phase | item | GiB |", "|---|---|---|"]
        for phase, items in (("held", r.persistent), ("update", r.update), ("rollout", r.rollout)):
            out += [f"| {phase} | {k} | {_gib(b)} |" for k, b in items.items()]
    return "\n".join(out)


def all_reports():
    return [plan_report(p) for p in PLANS] + [plan_report(COUNTER_EXAMPLE)] + [plan_report(p) for p in LORA_PLANS]


BEGIN, END = "<!-- plan:begin -->\n", "\n<!-- plan:end -->"


def update_doc(path: str) -> None:
    """Replaces the text between the document's plan:begin / plan:end markers with `render`."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no '<!-- plan:begin -->' / '<!-- plan:end -->' markers to write between")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + render(all_reports()) + END + tail)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update-doc"] and len(sys.argv) == 3:
        update_doc(sys.argv[2])
    elif len(sys.argv) == 1:
        print(render(all_reports()))
    elif sys.argv[1:] == ["--attention", "dense"]:  # the quadratic score figures, for comparison
        print(render([plan_report(dataclasses.replace(r.plan, attention_impl="dense")) for r in all_reports()]))
    elif sys.argv[1:] == ["--colab"]:
        print(render_colab([colab_report(p) for p in COLAB_PLANS]))
    else:
        raise SystemExit("usage: plan.py [--update-doc docs/pod_plan.md | --colab | --attention dense]")
