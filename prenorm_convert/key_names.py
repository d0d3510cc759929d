"""Stored key -> the name of the model parameter it loads into, by transformers' own load-time
renamings (docs/architecture.md "Stored keys").

transformers 5 renames many families' modules in memory while their checkpoints keep the old
names (ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``), and
adds or strips the base model's prefix. Its conversion mapping is the one source of truth for
that, so it is used as it is; what it cannot express as a plain rename (a stored tensor split or
merged at load, a ``WeightConverter``) is refused, naming the tensor.
"""

from __future__ import annotations

from typing import Callable

from .errors import UnsupportedModelError


def stored_key_renamer(model) -> Callable[[str], str]:
    """A function from a stored key to the model's parameter name (the key itself when transformers
    has no renaming for it, or has no conversion mapping at all)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time conversions: keys are the names
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys((name for name, _ in model.named_parameters(remove_duplicate=False)), True)

    def rename(key: str) -> str:
        renamed, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if converter is not None:
            raise UnsupportedModelError(
                f"transformers splits or merges the stored tensor '{key}' when it loads this {type(model).__name__} "
                f"(it becomes '{renamed}' and more); a conversion of such a layout is not supported yet"
            )
        return renamed

    return rename
