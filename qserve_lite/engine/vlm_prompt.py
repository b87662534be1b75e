"""VILA1.5 prompts: the conversation templates and the token ids of a prompt with `<image>` in it.

Each `<image>` of the text becomes tokens_per_image placeholder ids (IMAGE_PLACEHOLDER_ID, an ordinary
vocabulary id whose embedding is never used: the engine feeds the image's projected embeddings at those
positions, engine/sequence.PromptEmbeds); the text between images is tokenized without special tokens and the
whole prompt starts with the tokenizer's BOS once (VILA's tokenizer_image_token keeps BOS on the first chunk).

Templates (VILA's conversation.py; `{prompt}` is the user's text): vicuna_v1 for VILA1.5-3B / 13B, llama_3 for
Llama-3-VILA1.5-8B, hermes-2 for VILA1.5-40B; zero_shot is the template QServe's caption script ends up with
for VILA1.5 paths; plain is the text alone.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.errors import QServeLiteError

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER_ID = 0  # QServe looks the image token up as id 0 before splicing
DEFAULT_CAPTION_PROMPT = "<image> Please describe the picture in detail."  # QServe's caption prompt

_SYSTEM_CHAT = ("A chat between a curious {who} and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the {who}'s questions.")
_SYSTEM_VISION = ("You are a helpful language and vision assistant. "
                  "You are able to understand the visual content that the user provides, "
                  "and assist the user with a variety of tasks using natural language.")
_H = "<|start_header_id|>{}<|end_header_id|>\n\n"
TEMPLATES = {
    "vicuna_v1": _SYSTEM_CHAT.format(who="user") + " USER: {prompt} ASSISTANT:",
    "llama_3": ("<|begin_of_text|>" + _H.format("system") + _SYSTEM_VISION + "<|eot_id|>" + _H.format("user")
                + "{prompt}<|eot_id|>" + _H.format("assistant")),
    "hermes-2": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{prompt}<|im_end|>"
                 "<|im_start|>assistant\n"),
    "zero_shot": _SYSTEM_CHAT.format(who="human") + "\n### Human: {prompt}\n### Assistant:",
    "plain": "{prompt}",
}


def apply_template(template: str, prompt: str) -> str:
    if template not in TEMPLATES:
        raise QServeLiteError(f"unknown conversation template {template!r}; one of {', '.join(TEMPLATES)}")
    if IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n{prompt}"  # VILA's run script puts the image first when the text has none
    return TEMPLATES[template].replace("{prompt}", prompt)


def image_prompt(tokenizer, text: str, tokens_per_image: int) -> tuple[list[int], np.ndarray]:
    """(token ids, positions of the image placeholders) of a templated text with `<image>` markers."""
    chunks = text.split(IMAGE_TOKEN)
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    if bos is not None and not text.startswith(tokenizer.bos_token or "\0"):
        ids.append(int(bos))
    positions = []
    for i, chunk in enumerate(chunks):
        if i:
            positions.append(np.arange(len(ids), len(ids) + tokens_per_image))
            ids.extend([IMAGE_PLACEHOLDER_ID] * tokens_per_image)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    if not positions:
        raise QServeLiteError(f"the prompt has no {IMAGE_TOKEN}")
    return ids, np.concatenate(positions)


def synthetic_image_prompt(rng: np.random.Generator, vocab_size: int, text_tokens: int,
                           tokens_per_image: int) -> tuple[list[int], np.ndarray]:
    """A benchmark prompt without a tokenizer: one random id, the image, then text_tokens - 1 random ids
    (QServe's image benchmark: 224 - 196 + 1 prompt ids, 224 tokens once the image is expanded)."""
    text = rng.integers(1, vocab_size, size=max(1, text_tokens)).tolist()
    ids = text[:1] + [IMAGE_PLACEHOLDER_ID] * tokens_per_image + text[1:]
    return ids, np.arange(1, 1 + tokens_per_image)
