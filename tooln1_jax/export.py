"""Export a training run's checkpoint as a Hugging Face safetensors folder (a LoRA run: merged).

    python -m tooln1_jax.export runs/tiny_cpu hf_out [--step 80] [--tokenizer TOKENIZER_DIR]
    python -m tooln1_jax.export runs/lora_run adapter_out --peft    # a LoRA run's adapters alone

The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and with
`tooln1_jax.models.load_pretrained`; with `--peft`, `peft.PeftModel.from_pretrained(base, folder)`
loads it onto the run's base model. On a multi-host slice run it on every host with
`--distributed` (the same arguments everywhere): every process restores its shards and process 0
writes the folder.
"""

from __future__ import annotations

import argparse
import sys

from tooln1_jax import distributed
from tooln1_jax.checkpoint import export_hf, export_peft


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tooln1_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a run's output_dir (or its checkpoints/ folder)")
    p.add_argument("output", help="the HF folder to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id to save beside the weights")
    p.add_argument(
        "--peft", action="store_true", help="a LoRA run: write its adapters as a PEFT adapter folder, not merged"
    )
    distributed.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distributed.initialize_from_args(args)
    from transformers import AutoTokenizer  # at its one point of use: it imports torch

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    try:
        if args.peft:
            out = export_peft(args.checkpoint, args.output, step=args.step)
        else:
            out = export_hf(args.checkpoint, args.output, step=args.step, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
