"""A small deterministic BPE tokenizer for the tiny demo model, with Qwen's chat format.

Byte-level BPE (every byte string round-trips) trained with the `tokenizers` library on
synthetic tool-calling text: the rendered Tool-N1 system prompt, queries, tool JSON and
answers. Pre-tokenization isolates letter runs, single digits and runs of other characters,
so a value such as `Paris` or `42` is the same tokens in the query and in the JSON answer
(easy to copy for a tiny model), while JSON punctuation like `", "` merges into one token.
A JSON key with its colon (`city": "`) is one piece: the token just before a value then
names the argument being filled, so a one-layer attention can find the value in the query.

Phrase tokens keep CPU prompts short: the constant paragraphs of the Tool-N1 system prompt
(taken from `prompt.system_message`, so they follow its wording) and the JSON skeleton of a
tool line are single added tokens. Without them the fixed instructions and example alone cost
~240 tokens per prompt, most of a tiny model's compute.

It is wrapped as `transformers.PreTrainedTokenizerFast` with Qwen's special tokens and a
ChatML chat template, so prompt rendering (`render_prompt`) works unchanged, and it saves
with `save_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tooln1_jax.data.prompt import format_completion, system_message
from tooln1_jax.data.records import ToolRecord
from tooln1_jax.data.synthetic import SyntheticConfig, corpus_text, generate, template_reasoning
from tooln1_jax.data.xlam import convert_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
# Not "special" (as in Qwen): they stay in decoded text, where the reward looks for them.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tools>",
    "</tools>",
    "<tool_response>",
    "</tool_response>",
)

# Qwen2.5-style ChatML, without the default system prompt; tool results go back as a user turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The JSON skeleton of each `{"type": "function", "function": <tool>}` line in the tools block.
_TOOL_LINE_PHRASES = (
    '{"type": "function", "function": {"name": "',
    '", "description": "',
    '", "parameters": {',
    '": {"type": "',
)

_SPLIT_PATTERN = r"[A-Za-z_]+\": \"?|[A-Za-z]+|[0-9]|[^A-Za-z0-9]+"
_SPLIT = Regex(_SPLIT_PATTERN)
_FORMAT_VERSION = 2  # bump when the build changes in a way the fingerprint cannot see


def phrase_tokens() -> tuple[str, ...]:
    """The constant text around the tools block of the system prompt (training and evaluation
    wording), plus the tool-line skeleton. Matching picks the longest phrase at a position."""
    probe = ToolRecord(
        source="probe",
        id="0",
        system="",
        tools=[{"name": "x", "description": "d", "parameters": {}}],
        conversations=[],
        answer=[],
    )
    out = []
    for for_eval in (False, True):
        text = system_message(probe, for_eval=for_eval)
        head, tail = text.split("<tools>\n", 1)[0], text.rsplit("\n</tools>", 1)[1]
        out += [head, tail]
    return tuple(dict.fromkeys(p for p in out + list(_TOOL_LINE_PHRASES) if p))


def default_corpus(num_records: int = 600, seed: int = 12345) -> list[str]:
    """Synthetic training text: rendered system prompts (tools, instructions, example) for a
    slice of generated problems, plus their queries, thoughts and answer blocks."""
    records = generate(num_records, SyntheticConfig(num_tools=6, max_calls=3), seed=seed)
    texts = corpus_text(records)
    for i, record in enumerate(convert_rows(records, source="synthetic")[0]):
        if i % 10 == 0:  # the constant parts need few copies to get merged
            texts.append(system_message(record, for_eval=i % 20 == 0))
            texts += ["system\n", "user\n", "assistant\n"]  # the chat template's role lines
        texts.append(format_completion(record.answer, template_reasoning(record.answer)))
    return texts


def build_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1536) -> PreTrainedTokenizerFast:
    """Trains the BPE on `texts` (default: `default_corpus()`) and wraps it for transformers.

    The same texts and vocab_size always give the same tokenizer.
    """
    texts = list(default_corpus() if texts is None else texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_SPLIT, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + list(MARKUP_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Added tokens match before pre-tokenization, so markup never splits into pieces.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS + phrase_tokens()])
    from transformers import PreTrainedTokenizerFast  # transformers loads only when a tokenizer is made

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _fingerprint(texts: Sequence[str], vocab_size: int) -> str:
    """Identifies what a build depends on (corpus, vocab size, split rule, added tokens)."""
    spec = json.dumps([_FORMAT_VERSION, vocab_size, _SPLIT_PATTERN, SPECIAL_TOKENS, MARKUP_TOKENS, list(texts)])
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:16]


def load_or_build_tiny_tokenizer(
    path: str | os.PathLike | None = None, vocab_size: int = 1536
) -> PreTrainedTokenizerFast:
    """Loads the tiny tokenizer saved in `path` if it was built from the current corpus and
    settings; otherwise builds it (and saves it to `path` when given). A stale cache (older
    prompt wording or generator) is rebuilt, never silently reused."""
    texts = default_corpus()
    fingerprint = _fingerprint(texts, vocab_size)
    stamp = os.path.join(path, "tiny_tokenizer_fingerprint.txt") if path else None
    if stamp and os.path.exists(stamp) and os.path.exists(os.path.join(path, "tokenizer.json")):
        with open(stamp, encoding="utf-8") as f:
            if f.read().strip() == fingerprint:
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer = build_tiny_tokenizer(texts, vocab_size=vocab_size)
    if path:
        # Several processes (hosts of one run) may build at once: each writes its own folder and
        # moves the files in one by one, the fingerprint last, so a reader never sees half a save.
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path, prefix=".build_") as tmp:
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, os.path.basename(stamp)), "w", encoding="utf-8") as f:
                f.write(fingerprint + "\n")
            names = sorted(os.listdir(tmp), key=lambda n: n == os.path.basename(stamp))
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
    return tokenizer
