"""Conversion memory does not grow with depth (docs/architecture.md "Quality bars"): 4 and 16 layers, measured.

Each conversion runs in its own process, which reports its own peak resident memory (VmHWM from
/proc/self/status: it restarts at exec, unlike ru_maxrss, which would include the test process
the child was forked from). Twelve more layers add 85 MB of float32 weights here; holding them
(or their float64 copies) would add at least that much. The bar is a fifth of it. Measured on the
project's 2-core test machine: 4 layers 356 MiB, 16 layers 362 MiB (docs/performance.md).
"""

from __future__ import annotations

from conftest import child_peak_rss
from prenorm_convert.examples import build_checkpoint

SHAPE = {"n_embd": 384, "n_head": 6, "n_positions": 256}
CONVERT = "import sys; from prenorm_convert.conversion import convert; convert(sys.argv[1], sys.argv[2], verify_output=False)"


def weight_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def test_peak_memory_flat_from_4_to_16_layers(tmp_path):
    peaks, sizes = {}, {}
    for layers in (4, 16):
        src = tmp_path / f"gpt2-{layers}"
        build_checkpoint(src, "gpt2", seed=layers, overrides={**SHAPE, "n_layer": layers}, tokenizer=False, max_shard_size="50MB")
        sizes[layers] = weight_bytes(src)
        peaks[layers] = child_peak_rss(CONVERT, src, tmp_path / f"out-{layers}")
    added_weights = sizes[16] - sizes[4]
    assert added_weights > 80e6
    growth = peaks[16] - peaks[4]
    print(f"peak RSS: 4 layers {peaks[4] / 2**20:.0f} MiB, 16 layers {peaks[16] / 2**20:.0f} MiB; weights +{added_weights / 1e6:.0f} MB")
    assert growth < 0.2 * added_weights, (peaks, sizes)
