"""Whether a verification holds its models in memory or streams them (docs/report.md "Streamed
verification"), decided before anything is loaded, from the checkpoint's headers and config.

In memory, verification holds the float32 original and the converted model, then the original in
float64 (or, for a reduced dtype, the original in that dtype): about 8 bytes per parameter at its
peak. Streamed, it holds the largest single tensor as a module runs (in float64 for the float64
run), one read buffer, and the activations and logits of one batch of prompts: the budget left
after the first two sets how many prompt positions go into a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import SourceCheckpoint
from .errors import BadInputError
from .sizes import format_bytes
from .streaming import READ_BLOCK_BYTES

IN_MEMORY_BYTES_PER_PARAMETER = 8
# what loading the models' code and objects adds to the process once the run starts (measured:
# about 175 MiB for GPT-2 and Pythia shapes, torch and transformers already imported)
LOADED_CODE_BYTES = 200 << 20
# per prompt position: its logits in float64 about three times over (the output, the softmax of
# the comparison, a copy), and its hidden states at four times the width in float64 (the MLP)
LOGIT_COPIES = 3
HIDDEN_WIDTHS = 4
# a batch holds at least this many positions (a short prompt; a longer one goes alone into its own
# batch, over the plan by its extra positions), and at most this many prompts
MIN_BATCH_POSITIONS = 32
MAX_BATCH_PROMPTS = 16
# in memory, a run of the built-in prompts is about this many positions
IN_MEMORY_POSITIONS = 512
# of the memory the kernel reports available, the share a default run plans to use
AVAILABLE_SHARE = 0.85
# layer-streamed greedy decoding reads the whole model once per token: a few tokens on one prompt,
# next to the teacher-forced top-1 agreement over every position of every prompt
STREAMED_GREEDY_TOKENS = 4
STREAMED_GREEDY_PROMPTS = 1


@dataclass
class MemoryPlan:
    """How a verification holds its models: in memory, or streamed within ``budget`` bytes with at
    most ``batch_positions`` prompt positions (prompts × longest) per batch."""

    streamed: bool
    budget: int | None = None
    fixed_bytes: int = 0
    position_bytes: int = 0
    batch_positions: int = 0
    reason: str = ""

    def report(self) -> dict | None:
        if not self.streamed:
            return None
        return {
            "max_memory": self.budget,
            "estimated_peak": self.fixed_bytes + self.position_bytes * self.batch_positions,
            "batch_positions": self.batch_positions,
            "greedy_tokens": STREAMED_GREEDY_TOKENS,
            "greedy_prompts": STREAMED_GREEDY_PROMPTS,
            "reason": self.reason,
        }


def plan_memory(original: Path, vocab_size: int, hidden_size: int, max_memory: int | None, allow_pickle: bool) -> MemoryPlan:
    """In memory when both models fit in ``max_memory`` (default: the memory available now),
    streamed otherwise; a budget that cannot hold even one streamed layer is bad input."""
    parameters, largest = _parameter_counts(original, allow_pickle)
    baseline = resident_bytes() + LOADED_CODE_BYTES
    position_bytes = 8 * (LOGIT_COPIES * vocab_size + HIDDEN_WIDTHS * hidden_size)
    in_memory = baseline + IN_MEMORY_BYTES_PER_PARAMETER * parameters + IN_MEMORY_POSITIONS * position_bytes
    fixed = baseline + 8 * largest + READ_BLOCK_BYTES
    budget, asked = max_memory, max_memory is not None
    if budget is None:
        available = available_bytes()
        if available is None:
            return MemoryPlan(False)
        budget = resident_bytes() + int(AVAILABLE_SHARE * available)
    where = f"--max-memory {format_bytes(budget)}" if asked else f"the {format_bytes(budget)} this machine has available"
    if in_memory <= budget:
        return MemoryPlan(False, budget)
    positions = (budget - fixed) // position_bytes
    if positions < MIN_BATCH_POSITIONS:
        needed = fixed + MIN_BATCH_POSITIONS * position_bytes
        raise BadInputError(
            f"even one layer does not fit in {where}: a streamed verification needs about {format_bytes(needed)} "
            f"(this process with the models' code {format_bytes(baseline)}, the largest tensor in float64 "
            f"{format_bytes(8 * largest)}, activations of {MIN_BATCH_POSITIONS} positions "
            f"{format_bytes(MIN_BATCH_POSITIONS * position_bytes)}); give a larger --max-memory or run on a machine with more memory"
        )
    reason = f"both models in memory would need about {format_bytes(in_memory)}, over {where}"
    return MemoryPlan(True, budget, fixed, position_bytes, int(positions), reason)


def batch_sizes(lengths: list[int], plan: MemoryPlan) -> list[int]:
    """How many consecutive prompts go into each batch: one each in memory; streamed, as many as
    keep prompts × longest within the plan's positions (one at least) and MAX_BATCH_PROMPTS."""
    if not plan.streamed:
        return [1] * len(lengths)
    sizes, count, longest = [], 0, 0
    for length in lengths:
        if count and (count == MAX_BATCH_PROMPTS or (count + 1) * max(longest, length) > plan.batch_positions):
            sizes.append(count)
            count, longest = 0, 0
        count, longest = count + 1, max(longest, length)
    return sizes + ([count] if count else [])


def _parameter_counts(original: Path, allow_pickle: bool) -> tuple[int, int]:
    """(all parameters, the largest tensor's) of the original, from its headers."""
    source = SourceCheckpoint.open(original, allow_pickle=allow_pickle)
    try:
        sizes = [math.prod(info.shape) for info in source.tensors.values()]
    finally:
        source.close()
    return sum(sizes), max(sizes, default=0)


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is not available)."""
    return _proc_kib("/proc/self/status", "VmRSS:") * 1024


def available_bytes() -> int | None:
    """What the kernel says can be allocated without swapping (MemAvailable), or None."""
    kib = _proc_kib("/proc/meminfo", "MemAvailable:")
    return kib * 1024 if kib else None


def _proc_kib(path: str, key: str) -> int:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
