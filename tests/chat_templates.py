"""Chat templates of the model families people fine-tune, written from their published formats,
as test data for ``ChatCollator``: each with what one assistant turn must train on.

``TEMPLATES[name] = (jinja, expected)``: ``expected(content, last, eos)`` is the text the
labels of an assistant turn with ``content`` must decode to (``last``: the conversation's
last turn; ``eos``: the tokenizer's eos token, which Mistral and Phi-3 write).
Rendered with SmolLM2's tokenizer (its ``eos_token`` is ``<|im_end|>``), given each family's
markers as special tokens (:data:`SPECIAL_TOKENS`), as its own tokenizer holds them; Mistral's
``[INST]`` stays plain text, as in its first releases.
"""

from __future__ import annotations

from collections.abc import Callable

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen 3: earlier turns lose their reasoning; the generation prompt may open an empty
# <think> block, so it is not the start of the rendered turn.
_QWEN3_TURNS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
QWEN3 = (
    _QWEN3_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_NO_THINKING = (
    _QWEN3_TURNS + "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

# Mistral's [INST] format: no generation branch at all; the answer follows " ".
MISTRAL = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Phi-3 ends a conversation (not a turn) with the eos token.
PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# ChatML with transformers' {% generation %} markers around what the assistant writes.
CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message.content + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A template written without a generation branch, its header ending in a space.
NO_GENERATION_BRANCH = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}"
)

# (content, last turn?, the tokenizer's eos_token) -> what the labels decode to
Expected = Callable[[str, bool, str], str]

TEMPLATES: dict[str, tuple[str | None, Expected]] = {
    # None: SmolLM2's own template (ChatML, with a default system prompt).
    "smollm2": (None, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "chatml": (CHATML, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "chatml-generation-markers": (CHATML_GENERATION, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "llama3": (LLAMA3, lambda c, last, eos: f"{c.strip()}<|eot_id|>"),
    "qwen2.5": (QWEN25, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "qwen3": (QWEN3, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "qwen3-no-thinking": (QWEN3_NO_THINKING, lambda c, last, eos: f"{c}<|im_end|>\n"),
    "mistral": (MISTRAL, lambda c, last, eos: f"{c}{eos}"),
    "gemma": (GEMMA, lambda c, last, eos: f"{c.strip()}<end_of_turn>\n"),
    "phi3": (PHI3, lambda c, last, eos: f"{c}<|end|>\n" + (eos if last else "")),
    "no-generation-branch": (NO_GENERATION_BRANCH, lambda c, last, eos: f"{c}\n"),
}

# The markers each family's own tokenizer holds as single special tokens.
SPECIAL_TOKENS = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<think>", "</think>"],
    "qwen3-no-thinking": ["<think>", "</think>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
}


def tokenizer_for(name: str, base: object) -> object:
    """A copy of ``base`` (SmolLM2's tokenizer) with template ``name`` and its special tokens."""
    import copy

    tokenizer = copy.deepcopy(base)
    template, _ = TEMPLATES[name]
    if template is not None:
        tokenizer.chat_template = template
    if name in SPECIAL_TOKENS:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[name]})
    return tokenizer
