"""Names that gsae shares with other tools, as plain strings (no model is loaded to know them):
the default model's, and TransformerLens's names of hook points."""

from __future__ import annotations

import re

DEFAULT_MODEL = "smollm2-135m"
# The Hugging Face id of the model that the default GGUF quantizes: what other tools name it by.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The output of decoder block N in the model families gsae names hooks in.
BLOCK_OUTPUT = re.compile(r"(?:model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)")


def transformer_lens_hook(hook: str) -> str | None:
    """TransformerLens's name of a gsae hook point (a module path, as SAEs record it):
    `blocks.N.hook_resid_post` for the output of decoder block N, the residual stream after
    it (the hook point that a layer index names in gsae); None for any other module, which
    TransformerLens names otherwise or not at all."""
    match = BLOCK_OUTPUT.fullmatch(hook.strip())
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None
