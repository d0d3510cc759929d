"""Stored key -> the name of the model parameter it loads into, by transformers' own load-time
renamings (docs/architecture.md "Stored keys").

transformers 5 renames many families' modules in memory while their checkpoints keep the old
names (ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``), and
adds or strips the base model's prefix. Its conversion mapping is the one source of truth for
that, so it is used as it is. A stored tensor that transformers splits into equal row blocks at
load (a ``WeightConverter`` whose one operation is ``Chunk(dim=0)``: DINOv2's SwiGLU ``weights_in``)
maps to one name per block; any other split or merge is refused, naming the tensor.
"""

from __future__ import annotations

from typing import Callable

from .errors import UnsupportedModelError

Mapper = Callable[[str], list[str]]


def stored_key_mapper(model) -> Mapper:
    """A function from a stored key to the model's parameter names it loads into: one name (the key
    itself when transformers has no renaming for it), or one per row block of a chunked tensor."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time conversions: keys are the names
        return lambda key: [key]
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_source = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    names = dict.fromkeys((name for name, _ in model.named_parameters(remove_duplicate=False)), True)

    def names_of(key: str) -> list[str]:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if pattern is None:
            return [renamed]
        converter = by_source[pattern]
        operations = converter.operations
        if len(converter.source_patterns) != 1 or len(operations) != 1 or not isinstance(operations[0], Chunk) or operations[0].dim != 0:
            raise UnsupportedModelError(
                f"transformers rebuilds the stored tensor '{key}' from several tensors, or by more than a split into "
                f"row blocks, when it loads this {type(model).__name__}; a conversion of such a layout is not supported yet"
            )
        first = converter.target_patterns[0]
        return [renamed.replace(first, target) for target in converter.target_patterns]

    return names_of
