"""Nothing escapes the checkpoint and nothing odd is converted: shard names stay inside the folder,
FIFOs are never opened, every malformed safetensors header is refused with exit 2 (a fuzz over
mutated headers, judged against the safetensors library itself), and quantized or mixed-dtype
weights are refused up front with what to do instead. Each refusal writes nothing."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli, snapshot
from prenorm_convert import convert
from prenorm_convert.errors import BadInputError
from prenorm_convert.examples import build_checkpoint

INDEX = "model.safetensors.index.json"


def assert_refused(result, tmp_path, before, *words):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before


def copy_of(src: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    return folder


def edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


# -- shard names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shard_name",
    ["../outside/model.safetensors", "/etc/passwd", "../../../etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors", ""],
)
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused_before_anything_is_read(gpt2_dir, tmp_path, shard_name):
    src = copy_of(gpt2_dir, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(src.glob("*.safetensors"))[0]
    shutil.copy(first, outside / "model.safetensors")  # a real shard: reading it would "work"

    def point_away(weight_map):
        name = next(name for name, file in weight_map.items() if file == first.name)
        weight_map[name] = shard_name

    edit_index(src, point_away)
    before = snapshot(tmp_path)
    for command in (("convert", src, tmp_path / "out"), ("inspect", src)):
        assert_refused(run_cli(*command), tmp_path, before, INDEX, "inside the checkpoint folder")


def test_a_shard_folder_that_is_a_symlink_out_of_the_checkpoint_is_refused(gpt2_dir, tmp_path):
    src = copy_of(gpt2_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = sorted(src.glob("*.safetensors"))[0]
    shutil.move(first, elsewhere / first.name)
    (src / "shards").symlink_to(elsewhere)
    edit_index(src, lambda weight_map: weight_map.update({n: f"shards/{f}" for n, f in weight_map.items() if f == first.name}))
    before = snapshot(tmp_path)
    assert_refused(run_cli("convert", src, tmp_path / "out"), tmp_path, before, "leads outside the checkpoint folder")


def test_shards_in_a_subfolder_of_the_checkpoint_convert(gpt2_dir, tmp_path):
    src = copy_of(gpt2_dir, tmp_path)
    (src / "weights").mkdir()
    moved = {}
    for shard in sorted(src.glob("*.safetensors")):
        shutil.move(shard, src / "weights" / shard.name)
        moved[shard.name] = f"weights/{shard.name}"
    edit_index(src, lambda weight_map: weight_map.update({n: moved[f] for n, f in weight_map.items()}))
    result = run_cli("inspect", src, "--json")
    assert result.exit_code == 0, result.stderr


def run_bounded(*args, seconds: float = 60):
    """run_cli in a thread: a FIFO that were opened would block forever, and the test would hang."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=run_cli(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{args[0]} blocked on a FIFO"
    return box["result"]


@pytest.mark.parametrize("fifo_name", ["shard", "config.json", INDEX])
def test_a_fifo_in_the_checkpoint_is_refused_without_being_opened(gpt2_dir, tmp_path, fifo_name):
    src = copy_of(gpt2_dir, tmp_path)
    target = sorted(src.glob("*.safetensors"))[0] if fifo_name == "shard" else src / fifo_name
    target.unlink()
    os.mkfifo(target)
    before = snapshot(tmp_path)
    assert_refused(run_bounded("convert", src, tmp_path / "out"), tmp_path, before, target.name, "FIFO")


# -- malformed safetensors headers: a fuzz judged against the safetensors library ---------------


@pytest.fixture(scope="module")
def single_file_gpt2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("single") / "gpt2"
    build_checkpoint(folder, "gpt2", seed=11, max_shard_size="100MB")
    assert (folder / "model.safetensors").exists() and not (folder / INDEX).exists()
    return folder


def split_file(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(header_text: str | bytes, data: bytes, length: int | None = None) -> bytes:
    encoded = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _tensors(header):
    return sorted((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"][0])


def _edit(header, data, change):
    header = json.loads(json.dumps(header))
    change(header, _tensors(header))
    return join_file(json.dumps(header), data)


def _swap_same_sized(header, names):
    by_size = {}
    for name in names:
        by_size.setdefault(tuple(header[name]["shape"]), []).append(name)
    a, b = next(group for group in by_size.values() if len(group) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


def structured_mutations(header: dict, data: bytes) -> dict[str, bytes]:
    """Named mutations of one file: the damage the issue reports, and valid variants (which must convert)."""
    first_len = len(json.dumps(header))

    def set_field(field, value, which=0):
        return lambda h, names: h[names[which]].__setitem__(field, value)

    def overlap(h, names):
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]

    text = json.dumps(header)
    name0 = _tensors(header)[0]
    return {
        "overlapping offsets": _edit(header, data, overlap),
        "string offsets": _edit(header, data, lambda h, n: h[n[0]].__setitem__("data_offsets", [str(v) for v in h[n[0]]["data_offsets"]])),
        "float shape": _edit(header, data, lambda h, n: h[n[0]].__setitem__("shape", [float(v) for v in h[n[0]]["shape"]])),
        "negative offset": _edit(header, data, lambda h, n: h[n[0]].__setitem__("data_offsets", [-4, h[n[0]]["data_offsets"][1] - 4])),
        "negative shape": _edit(header, data, lambda h, n: h[n[0]].__setitem__("shape", [-1] + h[n[0]]["shape"][1:])),
        "reversed offsets": _edit(header, data, lambda h, n: h[n[0]].__setitem__("data_offsets", h[n[0]]["data_offsets"][::-1])),
        "unknown dtype": _edit(header, data, set_field("dtype", "Q4_K")),
        "dtype not a string": _edit(header, data, set_field("dtype", 7)),
        "missing shape": _edit(header, data, lambda h, n: h[n[0]].pop("shape")),
        "entry not an object": _edit(header, data, lambda h, n: h.__setitem__(n[0], [1, 2])),
        "non-string metadata": _edit(header, data, lambda h, n: h.__setitem__("__metadata__", {"format": 1})),
        "metadata not a map": _edit(header, data, lambda h, n: h.__setitem__("__metadata__", ["pt"])),
        "gap before a tensor": _edit(header, data, lambda h, n: [h[x].__setitem__("data_offsets", [o + 4 for o in h[x]["data_offsets"]]) for x in n]),
        "bytes left after the last tensor": join_file(text, data + bytes(8)),
        "truncated data": join_file(text, data[:-4]),
        "header length zero": join_file(text, data, length=0),
        "header length past the end": join_file(text, data, length=len(text) + len(data) + 9),
        "header length too short": join_file(text, data, length=first_len - 3),
        "header not JSON": join_file("{" + text[2:], data),
        "header not an object": join_file(json.dumps([1] * (len(text) // 3)), data),
        "duplicate tensor name": join_file(text[:-1] + ", " + json.dumps(name0) + ": " + json.dumps(header[name0]) + "}", data),
        "NaN constant": join_file(text.replace('"format": "pt"', '"format": NaN'), data),
        "lone surrogate in a name": join_file(text.replace(json.dumps(name0), '"\\ud800' + name0 + '"', 1), data),
        "header not UTF-8": join_file(text.encode().replace(b'"pt"', b'"\xff\xfe"'), data),
        # valid variants: the library reads them, so they must convert exactly
        "valid: keys reordered": join_file(json.dumps(dict(reversed(list(header.items())))), data),
        "valid: extra metadata": _edit(header, data, lambda h, n: h["__metadata__"].update({"note": "x"})),
        "valid: header padded with spaces": join_file(text + " " * 13, data),
        "valid: two same-shaped tensors swapped": _edit(header, data, _swap_same_sized),
    }


def random_mutations(raw: bytes, count: int, seed: int = 17) -> dict[str, bytes]:
    """Single-byte changes inside the header JSON (digits, quotes, brackets, letters)."""
    (length,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(seed)
    found = {}
    while len(found) < count:
        position = 8 + rng.randrange(length)
        value = rng.choice(b'0123456789"[]{},:-. aeFIU')
        if raw[position] != value:
            found[f"byte {position} -> {chr(value)!r}"] = raw[:position] + bytes([value]) + raw[position + 1 :]
    return found


def library_reads(file: Path) -> bool:
    try:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - any refusal by the library counts
        return False


def test_fuzzed_headers_are_refused_with_exit_2_or_converted_exactly(single_file_gpt2, tmp_path):
    raw = (single_file_gpt2 / "model.safetensors").read_bytes()
    header, data = split_file(raw)
    mutations = {**structured_mutations(header, data), **random_mutations(raw, 24)}
    converted_ok, refused = [], []
    for number, (name, mutated) in enumerate(mutations.items()):
        case = tmp_path / f"case{number}"
        src = case / "src"
        shutil.copytree(single_file_gpt2, src)
        (src / "model.safetensors").write_bytes(mutated)
        out = case / "out"
        result = run_cli("convert", src, out, "--quiet")
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert result.exit_code in (0, 2), (name, result.exit_code, result.stderr)
        if result.exit_code == 2:
            assert result.stderr.startswith("error: ") and not out.exists(), (name, result.stderr)
            refused.append(name)
        else:
            # the library agrees the file is valid, and the conversion was verified against it
            assert library_reads(src / "model.safetensors"), name
            converted_ok.append(name)
        if not library_reads(src / "model.safetensors"):
            assert result.exit_code == 2, f"{name}: the safetensors library refuses this file, but it was converted"
        shutil.rmtree(case)
    assert all(name.startswith("valid:") for name in converted_ok if not name.startswith("byte")), converted_ok
    assert {name for name in mutations if name.startswith("valid:")} <= set(converted_ok)
    assert "overlapping offsets" in refused and "negative offset" in refused


def test_a_negative_offset_names_the_offsets_not_disk_space(single_file_gpt2, tmp_path):
    header, data = split_file((single_file_gpt2 / "model.safetensors").read_bytes())
    src = copy_of(single_file_gpt2, tmp_path)
    (src / "model.safetensors").write_bytes(structured_mutations(header, data)["negative offset"])
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out", "--no-verify")
    assert_refused(result, tmp_path, before, "data_offsets", "non-negative integers")
    assert "free space" not in result.stderr


# -- quantized and odd dtypes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "block, method",
    [
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"load_in_8bit": True}, "bitsandbytes"),
        ({"quant_method": "fp8"}, "fp8"),
    ],
)
def test_a_quantization_config_is_refused_before_any_work(gpt2_dir, tmp_path, block, method):
    src = copy_of(gpt2_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
    before = snapshot(tmp_path)
    assert_refused(run_cli("convert", src, tmp_path / "out"), tmp_path, before, "quantized", method, "dequantize")


def retype_one(folder: Path, name_part: str, dtype: torch.dtype) -> str:
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        names = [name for name in tensors if name_part in name]
        if names:
            tensors[names[0]] = tensors[names[0]].to(dtype)
            save_file(tensors, shard, metadata={"format": "pt"})
            return names[0]
    raise AssertionError(name_part)


@pytest.mark.parametrize("dtype, word", [(torch.int8, "int8 (I8)"), (torch.float8_e4m3fn, "float8_e4m3fn (F8_E4M3)"), (torch.int32, "int32 (I32)")])
def test_integer_and_fp8_weights_are_refused_before_any_work(gpt2_dir, tmp_path, dtype, word):
    src = copy_of(gpt2_dir, tmp_path)
    name = retype_one(src, "mlp.c_fc.weight", dtype)
    before = snapshot(tmp_path)
    assert_refused(run_cli("convert", src, tmp_path / "out"), tmp_path, before, name, word, "dequantize")


def test_mixed_float_dtypes_need_an_explicit_dtype_and_then_convert_exactly(gpt2_dir, tmp_path):
    src = copy_of(gpt2_dir, tmp_path)
    retype_one(src, "mlp.c_fc.weight", torch.float16)
    retype_one(src, "attn.c_attn.weight", torch.bfloat16)
    before = snapshot(tmp_path)
    assert_refused(run_cli("convert", src, tmp_path / "out"), tmp_path, before, "more than one dtype", "--dtype float32")
    with pytest.raises(BadInputError, match="dtype='float32'"):
        convert(src, tmp_path / "out")
    assert snapshot(tmp_path) == before
    result = run_cli("convert", src, tmp_path / "out", "--dtype", "float32", "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True


def test_pickle_refusal_names_the_python_argument_in_the_api(gpt2_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(gpt2_dir / "config.json", src / "config.json")
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    with pytest.raises(BadInputError, match="allow_pickle=True"):
        convert(src, tmp_path / "out")
    result = run_cli("convert", src, tmp_path / "out2")
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr
