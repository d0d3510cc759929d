"""Which stored tensor is which model tensor: stored keys mapped to the parameters and persistent
buffers of the model transformers builds (transformers' own load-time renamings, then the spec's
key aliases; docs/architecture.md "Stored keys"), and their shapes checked against it."""

from __future__ import annotations

from dataclasses import replace

from .dtype_checks import quantized_hint
from .errors import CorruptCheckpointError, UnsupportedModelError
from .key_names import stored_key_mapper
from .spec import FamilySpec, expand


def map_stored_keys(source, spec: FamilySpec, model, tensors: dict, num_layers: int) -> dict[str, str]:
    """Model tensor name -> stored key, for every stored tensor (``tensors``: the model's parameters and
    persistent buffers; ``num_layers``: the most layers of any stream, for the spec's ignore patterns).
    A tensor split into row blocks at load is registered in ``source`` as one tensor per block.
    Anything the spec cannot place is refused."""
    known = set(tensors)
    ignored = {name for pattern in spec.ignore for name in expand(pattern, num_layers)}
    mapping, unknown = {}, []
    names_of = stored_key_mapper(model)
    for stored in list(source.tensors):
        if stored in ignored:
            continue
        canonical = spec.canonical_key(stored, known | ignored)
        if canonical not in known | ignored:
            names = names_of(stored)
            if len(names) > 1:  # split into row blocks at load: each block is a tensor of its own
                stored_blocks = _row_blocks(source, stored, names)
                mapping.update({name: block for name, block in zip(names, stored_blocks) if name in known})
                continue
            canonical = spec.canonical_key(names[0], known | ignored)
        if canonical in known:
            mapping[canonical] = stored
        elif canonical not in ignored:
            unknown.append(stored)
    if unknown:
        hint = quantized_hint(source.tensors[key].dtype for key in unknown)
        raise UnsupportedModelError(
            f"the checkpoint holds tensor(s) {unknown[:3]}{' …' if len(unknown) > 3 else ''} that a "
            f"{spec.family} model built from its config.json does not have; config and weights disagree{hint}"
        )
    return mapping

def _row_blocks(source, stored: str, names: list[str]) -> list[str]:
    """A stored tensor that transformers splits into equal row blocks at load, as one stored
    tensor per block (each a contiguous byte range of the file), registered under the block's
    own key; every later step reads them like any other stored tensor."""
    info = source.tensors[stored]
    count = len(names)
    if not info.offset or info.shape[0] % count:
        raise UnsupportedModelError(
            f"'{stored}' is split into {count} row blocks when transformers loads it; that needs it stored in a "
            f"safetensors file with a first dimension divisible by {count}, and it is not"
        )
    rows, size = info.shape[0] // count, info.nbytes // count
    keys = []
    for index, name in enumerate(names):
        key = f"{stored}[{index}/{count}]"
        source.tensors[key] = replace(info, name=key, shape=(rows, *info.shape[1:]), offset=info.offset + index * size, nbytes=size)
        keys.append(key)
    del source.tensors[stored]
    return keys

def check_shapes(source, spec: FamilySpec, stored_keys: dict[str, str], tensors: dict) -> None:
    """Every stored tensor has the shape the model built from config.json gives its parameter."""
    for canonical, stored in stored_keys.items():
        expected, found = tuple(tensors[canonical].shape), tuple(source.tensors[stored].shape)
        if expected != found:
            raise CorruptCheckpointError(
                f"config.json and the weights disagree: '{stored}' is {list(found)} in the file, but a "
                f"{spec.family} model built from config.json has {list(expected)}; "
                "the config belongs to another checkpoint (fix or re-download it)"
            )
