"""Hub in, hub out, with the real huggingface_hub client.

Downloads run against a loopback server standing in for the hub (tests/hub_server.py, reached
through the client's endpoint constant, as HF_ENDPOINT would set it) and against a cache laid out
by hand in the standard layout with HF_HUB_OFFLINE. Uploads (`push`, `convert --push-to-hub`) run
against the same server: it answers the preupload call with "regular" for every file, so the
client sends the bytes inline in the NDJSON commit (no LFS/Xet transfer is served).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import constants

from conftest import run_cli, snapshot
from hub_server import WRITE_TOKEN, FakeHub, SilentEndpoint, write_cache

REPO = "acme/tiny-gpt2"
PUSHED = "acme/tiny-gpt2-rmsnorm"
# files a hub repo holds that a conversion must never fetch
DECOYS = {
    "pytorch_model.bin": b"not a pickle: downloading this is a bug",
    "flax_model.msgpack": b"other framework",
    "rust_model.ot": b"other framework",
    "onnx/model.onnx": b"subfolder",
    "README.md": b"---\nlicense: mit\n---\n# the source's card\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
NEVER_FETCHED = ("pytorch_model.bin", ".msgpack", ".ot", "onnx", "README.md", ".gitattributes")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def repo_files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def point_client_at(patch, endpoint: str, cache, offline: bool = False) -> None:
    """What HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE do, for a client already imported (it reads them at import)."""
    patch.setattr(constants, "ENDPOINT", endpoint)
    patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    patch.setattr(constants, "HF_HUB_OFFLINE", offline)
    patch.setattr(constants, "HF_HUB_CACHE", str(cache))
    patch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-saved-token"))
    patch.delenv("HF_TOKEN", raising=False)
    patch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def closed_port_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub() as server, pytest.MonkeyPatch.context() as patch:
        point_client_at(patch, server.endpoint, tmp_path_factory.mktemp("hf-cache"))
        yield server


@pytest.fixture(scope="module")
def conversions(hub, gpt2_dir, tmp_path_factory):
    """The same checkpoint converted from its folder and from the hub (verified, then pushed)."""
    commit = hub.add_repo(REPO, {**repo_files(gpt2_dir), **DECOYS})
    root = tmp_path_factory.mktemp("hub-conversions")
    local = run_cli("convert", gpt2_dir, root / "local", "--quiet")
    assert local.exit_code == 0, local.stderr
    remote = run_cli("convert", REPO, root / "hub", "--quiet", "--push-to-hub", PUSHED, "--private", "--token", WRITE_TOKEN)
    assert remote.exit_code == 0, remote.stderr
    return SimpleNamespace(commit=commit, local=root / "local", hub=root / "hub", source=gpt2_dir)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def assert_same_weights_and_side_files(expected, actual):
    for name, data in repo_files(expected).items():
        if name.endswith(WEIGHT_SUFFIXES) or name.startswith(("tokenizer", "generation_config", "modeling_prenorm")):
            assert (actual / name).read_bytes() == data, name


# -- download ---------------------------------------------------------------------------------


def test_hub_conversion_is_the_local_conversion_plus_the_revision(conversions, hub):
    local, remote = conversions.local, conversions.hub
    assert sorted(repo_files(local)) == sorted(repo_files(remote))
    for name, data in repo_files(local).items():
        if name not in ("config.json", "README.md", "conversion_report.json"):
            assert (remote / name).read_bytes() == data, name
    local_config = json.loads((local / "config.json").read_text())
    hub_config = json.loads((remote / "config.json").read_text())
    assert (hub_config["prenorm"].pop("source"), hub_config["prenorm"].pop("source_revision")) == (REPO, conversions.commit)
    assert (local_config["prenorm"].pop("source"), local_config["prenorm"].pop("source_revision")) == (str(conversions.source), None)
    assert hub_config == local_config
    local_report = json.loads((local / "conversion_report.json").read_text())
    hub_report = json.loads((remote / "conversion_report.json").read_text())
    assert (hub_report["source"], hub_report["source_revision"]) == (REPO, conversions.commit)
    assert hub_report["passed"] and hub_report["greedy_match"] == local_report["greedy_match"]
    assert hub_report["max_abs_logit_diff"] == pytest.approx(local_report["max_abs_logit_diff"], rel=1e-3, abs=1e-9)
    fetched = [path for path in hub.paths_requested() if "/resolve/" in path]
    assert fetched and not [path for path in fetched if any(decoy in path for decoy in NEVER_FETCHED)]


def test_offline_reads_a_standard_layout_cache(conversions, hub, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = {**repo_files(conversions.source), "pytorch_model.bin": b"garbage: never read while safetensors exist"}
    write_cache(tmp_path / "cache", "acme/cached", commit, files, refs={"main": commit, "v1.0": commit})
    point_client_at(monkeypatch, hub.endpoint, tmp_path / "cache", offline=True)
    requests_before = len(hub.requests)
    for name, revision in (("main", []), ("tag", ["--revision", "v1.0"]), ("commit", ["--revision", commit])):
        out = tmp_path / name
        result = run_cli("convert", "acme/cached", out, "--quiet", "--no-verify", *revision)
        assert result.exit_code == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["prenorm"]["source_revision"] == commit
        assert_same_weights_and_side_files(conversions.local, out)
    assert len(hub.requests) == requests_before, "offline mode must not touch the network"


def test_offline_reuses_what_an_online_conversion_cached(conversions, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub.requests)
    result = run_cli("inspect", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["source"], info["source_revision"], info["family"]) == (REPO, conversions.commit, "gpt2")
    assert len(hub.requests) == requests_before


@pytest.mark.parametrize("options", [(), ("--fold-affine",), ("--target", "crmsnorm")], ids=["rmsnorm", "fold-affine", "crmsnorm"])
def test_inspect_on_a_hub_id_reads_headers_not_weights(hub, gpt2_dir, gpt2_bare_dir, options):
    """Sharded (index + shards) and single-file repos: the same answer as the local folder, from
    config.json, the index, each header and the few tensors planning reads (the norms' β, to know
    which readers gain a bias), all by range requests."""
    for repo, folder in (("acme/inspect-sharded", gpt2_dir), ("acme/inspect-single", gpt2_bare_dir)):
        commit = hub.add_repo(repo, {**repo_files(folder), **DECOYS}) if repo not in hub.repos else hub.repos[repo].refs["main"]
        before = len(hub.requests)
        remote, local = run_cli("inspect", repo, "--json", *options), run_cli("inspect", folder, "--json", *options)
        assert remote.exit_code == 0 and local.exit_code == 0, remote.stderr + local.stderr
        remote_info, local_info = json.loads(remote.stdout), json.loads(local.stdout)
        assert (remote_info.pop("source"), remote_info.pop("source_revision")) == (repo, commit)
        assert (local_info.pop("source"), local_info.pop("source_revision")) == (str(folder), None)
        assert remote_info == local_info
        requests = hub.requests[before:]
        weights = {name: data for name, data in repo_files(folder).items() if name.endswith(".safetensors")}
        weight_reads = [r for r in requests if r.method == "GET" and r.path.endswith(".safetensors")]
        assert {r.path.rsplit("/", 1)[1] for r in weight_reads} == set(weights)
        assert all(r.range for r in weight_reads), "a weight file was requested whole"
        fetched = [r.path for r in requests if "/resolve/" in r.path]
        assert not [path for path in fetched if any(decoy in path for decoy in NEVER_FETCHED)]
        assert not [path for path in fetched if "tokenizer" in path], "inspect needs no side files"
    # the single file holds 0.4 MB, of which inspect reads the header and the β vectors
    (name, data), = weights.items()
    sent = sum(r.bytes_sent for r in weight_reads)
    assert sent < len(data) / 10, (sent, len(data))


def test_inspect_on_a_hub_id_copes_with_a_server_that_ignores_range(hub, gpt2_bare_dir):
    commit = hub.add_repo("acme/no-ranges", repo_files(gpt2_bare_dir))
    hub.honor_range = False
    try:
        remote = run_cli("inspect", "acme/no-ranges", "--json", "--fold-affine")
    finally:
        hub.honor_range = True
    local = run_cli("inspect", gpt2_bare_dir, "--json", "--fold-affine")
    assert remote.exit_code == 0, remote.stderr
    remote_info, local_info = json.loads(remote.stdout), json.loads(local.stdout)
    assert (remote_info.pop("source"), remote_info.pop("source_revision")) == ("acme/no-ranges", commit)
    local_info.pop("source"), local_info.pop("source_revision")
    assert remote_info == local_info


def test_inspect_on_a_hub_id_refuses_a_damaged_header(hub, gpt2_dir, tmp_path):
    header = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    damaged = len(header).to_bytes(8, "little") + header + bytes(8)
    hub.add_repo("acme/damaged", {"config.json": (gpt2_dir / "config.json").read_bytes(), "model.safetensors": damaged})
    before = snapshot(tmp_path)
    result = run_cli("inspect", "acme/damaged", "--json")
    assert result.exit_code == 2, result.stderr
    assert "model.safetensors is not a valid safetensors file" in result.stderr and "'lm_head.weight'" in result.stderr
    assert result.stdout == "" and snapshot(tmp_path) == before


ESCAPING_SHARDS = {
    "other-repo": "../../models--acme--private/snapshots/main/model.safetensors",
    "absolute": "/etc/passwd",
    "not-in-repo": "model-00009-of-00009.safetensors",
}


def index_naming(folder, shard: str) -> dict[str, bytes]:
    """The folder's files, with the index mapping its first tensor to ``shard``."""
    files = repo_files(folder)
    index = json.loads(files["model.safetensors.index.json"])
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard
    return {**files, "model.safetensors.index.json": json.dumps(index).encode()}


@pytest.mark.parametrize("kind", sorted(ESCAPING_SHARDS))
def test_a_hub_index_names_only_files_of_its_own_repository(hub, gpt2_dir, tmp_path, kind):
    """An index naming another repository's cached files, an absolute path or a file the repository
    does not hold: refused before any weight is fetched, by convert and by inspect."""
    shard, repo = ESCAPING_SHARDS[kind], f"acme/escape-{kind}"
    hub.add_repo(repo, index_naming(gpt2_dir, shard))
    before = len(hub.requests)
    assert_refused(tmp_path / "convert", repo, repr(shard), "model.safetensors.index.json")
    inspected = run_cli("inspect", repo, "--json")
    assert inspected.exit_code == 2 and inspected.stdout == "", inspected.stderr
    lines = inspected.stderr.strip().splitlines()
    assert len(lines) == 1 and repr(shard) in lines[0], inspected.stderr
    weights = [r.path for r in hub.requests[before:] if r.method == "GET" and r.path.endswith(".safetensors")]
    assert weights == [], "no shard may be read"


@pytest.mark.parametrize("kind", ["other-repo", "absolute"])
def test_a_cached_index_names_only_files_inside_its_snapshot(hub, gpt2_dir, tmp_path, monkeypatch, kind):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    write_cache(tmp_path / "cache", "acme/cached-escape", commit, index_naming(gpt2_dir, ESCAPING_SHARDS[kind]), refs={"main": commit})
    point_client_at(monkeypatch, hub.endpoint, tmp_path / "cache", offline=True)
    assert_refused(tmp_path / "convert", "acme/cached-escape", repr(ESCAPING_SHARDS[kind]))
    inspected = run_cli("inspect", "acme/cached-escape", "--json")
    assert inspected.exit_code == 2 and repr(ESCAPING_SHARDS[kind]) in inspected.stderr, inspected.stderr


def test_verify_reads_a_hub_original_at_the_commit_the_conversion_records(hub, gpt2_dir, gpt2_bare_dir, tmp_path):
    first = hub.add_repo("acme/moving", repo_files(gpt2_dir))
    out = tmp_path / "out"
    assert run_cli("convert", "acme/moving", out, "--quiet", "--no-verify").exit_code == 0
    hub.commit("acme/moving", repo_files(gpt2_bare_dir))  # main now holds a different model
    result = run_cli("verify", "acme/moving", out, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and (report["source"], report["source_revision"]) == ("acme/moving", first)


# -- download failures: one line, exit 2, nothing written --------------------------------------


def assert_refused(tmp_path, src, *message_parts, extra=()):
    parent = tmp_path / "parent"
    parent.mkdir(parents=True)
    result = run_cli("convert", src, parent / "out", "--quiet", *extra)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for part in message_parts:
        assert part in lines[0], lines[0]
    assert snapshot(parent) == {}, "nothing may be written"


def test_offline_with_nothing_cached(hub, tmp_path, monkeypatch):
    point_client_at(monkeypatch, hub.endpoint, tmp_path / "empty-cache", offline=True)
    assert_refused(tmp_path, REPO, f"'{REPO}' is not in the local hub cache", "HF_HUB_OFFLINE")


def test_unreachable_hub_with_nothing_cached(tmp_path, monkeypatch):
    point_client_at(monkeypatch, closed_port_endpoint(), tmp_path / "empty-cache")
    assert_refused(tmp_path, REPO, "not in the local hub cache", "could not be reached")


def test_a_hub_that_never_answers_times_out(conversions, tmp_path, monkeypatch):
    """An endpoint that accepts connections and never answers: push, convert and inspect of a hub id
    give up after the timeouts huggingface_hub's variables set (read when the command runs), exit 2."""
    folder = tmp_path / "converted"
    shutil.copytree(conversions.hub, folder)
    parent = tmp_path / "parent"
    parent.mkdir()
    before = snapshot(tmp_path)
    with SilentEndpoint(hang_for=45) as silent:
        point_client_at(monkeypatch, silent.endpoint, tmp_path / "empty-cache")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        for args in (
            ("push", folder, "acme/hung", "--token", WRITE_TOKEN, "--quiet"),
            ("convert", REPO, parent / "out", "--quiet"),
            ("inspect", REPO, "--json"),
        ):
            started = time.monotonic()
            result = run_cli(*args)
            elapsed = time.monotonic() - started
            assert result.exit_code == 2, (args, result.exit_code, result.stderr)
            assert elapsed < 30, (args, elapsed)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "did not answer within 1 s" in lines[0] and "HF_HUB_ETAG_TIMEOUT" in lines[0], lines
        assert silent.accepted >= 3, "the endpoint was not contacted"
    assert snapshot(tmp_path) == before, "nothing may be written"


def test_hub_timeouts_follow_the_environment(monkeypatch):
    from prenorm_convert.hub import METADATA_TIMEOUT, TRANSFER_TIMEOUT, hub_timeouts

    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert hub_timeouts() == (METADATA_TIMEOUT, TRANSFER_TIMEOUT)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2.5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "not a number")
    assert hub_timeouts() == (2.5, TRANSFER_TIMEOUT)


def test_repository_not_found(hub, tmp_path):
    assert_refused(tmp_path, "acme/no-such-model", "'acme/no-such-model' was not found", "--token")


def test_revision_not_found(conversions, tmp_path):
    assert_refused(tmp_path, REPO, "revision 'v9' does not exist", extra=("--revision", "v9"))


def test_gated_repository_needs_an_accepted_token(hub, gpt2_dir, tmp_path, monkeypatch):
    hub.add_repo("acme/gated", repo_files(gpt2_dir), gated=True, read_token="hf_accepted")
    assert_refused(tmp_path / "anonymous", "acme/gated", "'acme/gated' is gated", "HF_TOKEN")
    assert_refused(tmp_path / "wrong-token", "acme/gated", "is gated", extra=("--token", "hf_not_accepted"))
    monkeypatch.setenv("HF_TOKEN", "hf_accepted")
    result = run_cli("inspect", "acme/gated", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["source"] == "acme/gated"


def test_pickle_only_repository_is_refused_before_downloading_the_pickle(hub, gpt2_dir, tmp_path):
    side = {name: data for name, data in repo_files(gpt2_dir).items() if not name.endswith(WEIGHT_SUFFIXES)}
    hub.add_repo("acme/pickled", {**side, "pytorch_model.bin": b"pickle"})
    assert_refused(tmp_path, "acme/pickled", "pickled", "--allow-pickle")
    assert not [path for path in hub.paths_requested() if path.endswith("pytorch_model.bin")]


def test_revision_is_for_hub_ids_only(gpt2_dir, tmp_path):
    assert_refused(tmp_path, gpt2_dir, "--revision applies to hub ids", extra=("--revision", "main"))


def test_local_looking_paths_are_never_hub_ids(tmp_path, monkeypatch):
    from prenorm_convert.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("openai-community/gpt2")
    (tmp_path / "org" / "local").mkdir(parents=True)
    for local in ("./org/name", "../org/name", "/org/name", "~/org/name", "org/local", "gpt2", "a/b/c", tmp_path / "x"):
        assert not is_hub_id(local), local


# -- push ---------------------------------------------------------------------------------------


def test_convert_push_to_hub_uploads_the_folder_with_a_card_the_hub_reads(conversions, hub):
    pushed = hub.files(PUSHED)
    local_card = (conversions.hub / "README.md").read_text()
    assert set(pushed) - {".gitattributes"} == set(repo_files(conversions.hub))  # the hub adds .gitattributes
    for name, data in repo_files(conversions.hub).items():
        if name != "README.md":
            assert pushed[name] == data, name
    # the folder's card says PATH_OR_REPO; the pushed one names the repository, and differs in nothing else
    assert pushed["README.md"].decode() == local_card.replace('from_pretrained("PATH_OR_REPO"', f'from_pretrained("{PUSHED}"')
    assert f'from_pretrained("{PUSHED}", trust_remote_code=True)' in pushed["README.md"].decode()
    assert hub.repos[PUSHED].private
    commits = [request for request in hub.requests if request.path == f"/api/models/{PUSHED}/commit/main"]
    assert commits and all(request.authorization == f"Bearer {WRITE_TOKEN}" for request in commits)
    card = pushed["README.md"].decode()
    front = front_matter(card)
    assert front["base_model"] == REPO and front["library_name"] == "transformers"
    assert {"rmsnorm", "prenorm-convert", "gpt2"} <= set(front["tags"])
    assert conversions.commit in card and "top-1 agreement" in card and "from_pretrained" in card
    assert "## Conversion command" in card and f"--revision {conversions.commit}" in card
    assert "base_model" not in front_matter((conversions.local / "README.md").read_text()), "a local path is no hub model"


def test_push_refuses_unverified_or_failed_folders_unless_forced(conversions, hub, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(conversions.hub, folder)
    report_path = folder / "conversion_report.json"
    report = json.loads(report_path.read_text())
    report_path.unlink()
    requests_before = len(hub.requests)
    refused = run_cli("push", folder, "acme/unverified", "--token", WRITE_TOKEN, "--quiet")
    assert refused.exit_code == 2 and "no conversion_report.json" in refused.stderr and "--force" in refused.stderr
    report_path.write_text(json.dumps({**report, "passed": False, "failures": ["max |Δlogit| 3 > 0.001"]}))
    refused = run_cli("push", folder, "acme/failed", "--token", WRITE_TOKEN, "--quiet")
    assert refused.exit_code == 2 and "did not pass verification (max |Δlogit| 3 > 0.001)" in refused.stderr
    assert len(hub.requests) == requests_before, "a refused push sends nothing"
    forced = run_cli("push", folder, "acme/failed", "--token", WRITE_TOKEN, "--quiet", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert hub.files("acme/failed")["conversion_report.json"] == report_path.read_bytes()
    assert not hub.repos["acme/failed"].private


def test_push_card_shows_a_verification_run_after_a_no_verify_conversion(gpt2_dir, hub, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    assert "Not verified" in (out / "README.md").read_text()
    verified = run_cli("verify", gpt2_dir, out, "--quiet", "--json", out / "conversion_report.json")
    assert verified.exit_code == 0, verified.stderr
    result = run_cli("push", out, "acme/verified-later", "--token", WRITE_TOKEN, "--quiet")
    assert result.exit_code == 0, result.stderr
    card = hub.files("acme/verified-later")["README.md"].decode()
    assert "Not verified" not in card and "top-1 agreement" in card and "| passed | yes |" in card


def test_push_refuses_a_folder_edited_after_verification_unless_forced(conversions, hub, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(conversions.hub, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    shard.write_bytes(bytes(data))
    requests_before = len(hub.requests)
    refused = run_cli("push", folder, "acme/edited", "--token", WRITE_TOKEN, "--quiet")
    assert refused.exit_code == 2, refused.stderr
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "changed after it was verified" in line and shard.name in line, line
    assert "prenorm-convert verify ORIGINAL" in line and "--force" in line, line
    assert len(hub.requests) == requests_before and "acme/edited" not in hub.repos, "a refused push sends nothing"
    forced = run_cli("push", folder, "acme/edited", "--token", WRITE_TOKEN, "--quiet", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert hub.files("acme/edited")[shard.name] == shard.read_bytes()


def test_push_refuses_a_report_that_records_no_file_hashes_unless_forced(conversions, hub, tmp_path):
    from prenorm_convert.errors import BadInputError
    from prenorm_convert.hub import push

    folder = tmp_path / "converted"
    shutil.copytree(conversions.hub, folder)
    report = json.loads((folder / "conversion_report.json").read_text())
    del report["files_sha256"]  # as an older prenorm-convert wrote it
    (folder / "conversion_report.json").write_text(json.dumps(report))
    refused = run_cli("push", folder, "acme/old-report", "--token", WRITE_TOKEN, "--quiet")
    assert refused.exit_code == 2 and "files_sha256" in refused.stderr and "verify ORIGINAL" in refused.stderr, refused.stderr
    with pytest.raises(BadInputError, match="force=True"):  # the Python API names its own argument
        push(folder, "acme/old-report", token=WRITE_TOKEN)
    assert "acme/old-report" not in hub.repos
    forced = run_cli("push", folder, "acme/old-report", "--token", WRITE_TOKEN, "--quiet", "--force")
    assert forced.exit_code == 0, forced.stderr


def test_push_to_an_existing_repo_adds_a_commit(conversions, hub):
    before = hub.add_repo("acme/existing", {"notes.txt": b"kept"})
    result = run_cli("push", conversions.local, "acme/existing", "--token", WRITE_TOKEN, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert hub.repos["acme/existing"].refs["main"] != before
    files = hub.files("acme/existing")
    assert files["notes.txt"] == b"kept" and files["config.json"] == (conversions.local / "config.json").read_bytes()


def test_push_failures_are_one_line_and_exit_2(conversions, gpt2_dir, hub, tmp_path, monkeypatch):
    cases = [
        (("push", conversions.hub, "acme/x", "--token", "hf_wrong"), "rejected the token"),
        (("push", gpt2_dir, "acme/x", "--token", WRITE_TOKEN), "not a folder written by prenorm-convert"),
        (("push", conversions.hub, "not-a-repo-id", "--token", WRITE_TOKEN), "not a hub repository id"),
    ]
    for args, message in cases:
        result = run_cli(*args, "--quiet")
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "acme/x" not in hub.repos
    parent = tmp_path / "parent"
    parent.mkdir()
    result = run_cli("convert", gpt2_dir, parent / "out", "--quiet", "--no-verify", "--push-to-hub", "acme/x")
    assert result.exit_code == 2 and "drop --no-verify" in result.stderr and snapshot(parent) == {}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("push", conversions.hub, "acme/x", "--token", WRITE_TOKEN, "--quiet")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.stderr


def test_card_shows_the_exact_command_with_the_token_masked(gpt2_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["convert", str(gpt2_dir), str(out), "--quiet", "--no-verify", "--token", "hf_secret_value"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/prenorm-convert", *args])
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    assert f"prenorm-convert convert {gpt2_dir} {out} --quiet --no-verify --token '***'" in card
    assert not [path for path in out.iterdir() if b"hf_secret_value" in path.read_bytes()]
