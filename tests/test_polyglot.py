"""Clients in other languages and the contract that they are built on.

- The Node.js client (client/node/chat.js) against a real server gives exactly the Python client's
  text and token ids for the same greedy request with an image.
- `make stubs` (tools/gen-stubs.sh) leaves Go, Java, C++ and TypeScript stubs in gen/, regenerates
  them idempotently, and the TypeScript ones type-check (tsc) and run against the server.
- `buf lint` is clean, `buf breaking` finds no break against every committed version of the contract,
  and does catch a deliberate break.
- The grpcurl recipes of docs/clients.md are run verbatim against the server, so they cannot rot.

Tools come from `make setup` (Debian packages, client/node/package-lock.json, the venv). Where one is
missing the test skips with the reason, except under CI (env CI set), where it fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from harness import IMAGES, ROOT, ServerProcess

from client import Video, VisionChatClient
from client.types import ChatResult

NODE_DIR = ROOT / "client" / "node"
NODE_BIN = NODE_DIR / "node_modules" / ".bin"
BUF = NODE_BIN / "buf"
TSC = NODE_BIN / "tsc"
GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"
GEN = ROOT / "gen"
DOCS = ROOT / "docs" / "clients.md"

IMAGE = IMAGES / "A_640x480.png"
PROMPT = "Describe the image."
NUM_CROPS = 4
MAX_NEW_TOKENS = 16


def _need(tool: Path | str, what: str) -> str:
    """The tool's path (a Path, or a command looked up on PATH); a missing one skips locally, fails under CI."""
    if isinstance(tool, Path):
        path = str(tool) if tool.exists() else None
    else:
        path = shutil.which(tool)
    if path is None:
        reason = f"{what} not found ({tool}); `make setup` installs it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _run(
    cmd: list[str], *, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def _json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects that grpcurl prints one after another (pretty-printed, no separators)."""
    decoder, pos, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


@pytest.fixture(scope="module")
def python_result(server: ServerProcess) -> ChatResult:
    """The reference: the Python client's greedy answer to the request every other client repeats."""
    with VisionChatClient(server.address) as client:
        result = client.chat(PROMPT, [IMAGE], num_crops=NUM_CROPS, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    assert len(result.token_ids) == MAX_NEW_TOKENS and result.finish_reason == "length"
    return result


def _node_chat(server: ServerProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    node = _need("node", "node")
    _need(NODE_DIR / "node_modules" / "@grpc" / "grpc-js", "npm packages of client/node")
    return _run([
        node, str(NODE_DIR / "chat.js"), "--server", server.address, "--image", str(IMAGE),
        "--num-crops", str(NUM_CROPS), "--max-new-tokens", str(MAX_NEW_TOKENS), "--ignore-eos", *extra, PROMPT,
    ], timeout=120)


# ----------------------------------------------------------------------------- Node.js client


def test_node_client_json_matches_python_client(server: ServerProcess, python_result: ChatResult) -> None:
    proc = _node_chat(server, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == python_result.text
    assert result["token_ids"] == python_result.token_ids
    assert result["finish_reason"] == "length"
    usage = python_result.usage
    # cached_tokens may differ: the second identical prompt can hit the prefix cache.
    got = result["usage"]
    assert (got["prompt_tokens"], got["image_tokens"], got["completion_tokens"]) == (
        usage.prompt_tokens, usage.image_tokens, usage.completion_tokens,
    )
    line = f"[finish=length prompt={usage.prompt_tokens} image={usage.image_tokens} completion={MAX_NEW_TOKENS} "
    assert line in proc.stderr


def test_node_client_streams_image_in_chunks_and_prints_tokens(
    server: ServerProcess, python_result: ChatResult
) -> None:
    # 64 KiB chunks: the 600 KB image goes over the Chat stream as ten image_chunk messages.
    assert IMAGE.stat().st_size > 8 * 65536
    proc = _node_chat(server, "--chunk-size", "65536")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == python_result.text + ("" if python_result.text.endswith("\n") else "\n")
    usage_line = r"^\[finish=length prompt=\d+ image=\d+ completion=16 ttft=[\d.]+s total=[\d.]+s\]$"
    assert re.search(usage_line, proc.stderr, re.M)


def test_node_client_reports_invalid_argument(server: ServerProcess) -> None:
    proc = _node_chat(server, "--num-crops", "17")  # the server allows 1..16
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "INVALID_ARGUMENT" in proc.stderr and "num_crops" in proc.stderr


# ----------------------------------------------------------------------------- generated stubs

STUBS = [
    "go/go.mod",
    "go/visionchat/v1/visionchat.pb.go",
    "go/visionchat/v1/visionchat_grpc.pb.go",
    "java/ai/visionchat/v1/VisionChatServiceGrpc.java",
    "java/ai/visionchat/v1/GenerateRequest.java",
    "java/ai/visionchat/v1/VisionChatProto.java",
    "cpp/visionchat/v1/visionchat.pb.h",
    "cpp/visionchat/v1/visionchat.pb.cc",
    "cpp/visionchat/v1/visionchat.grpc.pb.h",
    "cpp/visionchat/v1/visionchat.grpc.pb.cc",
    "ts/visionchat/v1/visionchat.ts",
]


def test_generated_stubs_exist() -> None:
    missing = [s for s in STUBS if not (GEN / s).is_file()]
    assert not missing, f"missing after `make stubs`: {missing}"
    go = (GEN / "go/visionchat/v1/visionchat_grpc.pb.go").read_text()
    assert "package visionchatv1" in go and "func NewVisionChatServiceClient(" in go
    assert "package ai.visionchat.v1;" in (GEN / "java/ai/visionchat/v1/VisionChatServiceGrpc.java").read_text()
    assert "class VisionChatService final" in (GEN / "cpp/visionchat/v1/visionchat.grpc.pb.h").read_text()
    ts = (GEN / "ts/visionchat/v1/visionchat.ts").read_text()
    assert "export const VisionChatServiceClient = makeGenericClientConstructor(" in ts


def _tree_digest(dirs: list[Path]) -> dict[str, str]:
    return {
        str(p.relative_to(GEN)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs for p in sorted(d.rglob("*")) if p.is_file()
    }


def test_gen_stubs_regenerates_cleanly_and_idempotently() -> None:
    for tool in ("protoc", "protoc-gen-go", "protoc-gen-go-grpc", "grpc_java_plugin", "grpc_cpp_plugin"):
        _need(tool, tool)
    _need(BUF, "buf")
    dirs = [GEN / lang for lang in ("go", "java", "cpp", "ts")]
    if not all(d.is_dir() for d in dirs):
        pytest.fail("gen/ is incomplete; run `make stubs`")
    before = _tree_digest(dirs)
    stale = GEN / "ts" / "visionchat" / "v1" / "removed_message.ts"
    stale.write_text("// left over from an older contract\n")
    proc = _run(["bash", str(ROOT / "tools" / "gen-stubs.sh")], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not stale.exists()
    assert _tree_digest(dirs) == before


def test_ts_stubs_type_check() -> None:
    tsc = _need(TSC, "tsc (npm typescript)")
    proc = _run([tsc, "-p", str(NODE_DIR / "tsconfig.json"), "--listFiles"], cwd=NODE_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = proc.stdout.splitlines()
    assert str(GEN / "ts/visionchat/v1/visionchat.ts") in checked
    assert str(NODE_DIR / "stubs-example.ts") in checked


def test_ts_stubs_run_against_server(server: ServerProcess, python_result: ChatResult, tmp_path: Path) -> None:
    tsc = _need(TSC, "tsc (npm typescript)")
    node = _need("node", "node")
    out = tmp_path / "js"
    proc = _run([tsc, "-p", str(NODE_DIR / "tsconfig.json"), "--noEmit", "false", "--outDir", str(out)], cwd=NODE_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = _run(
        [node, str(out / "client/node/stubs-example.js"), server.address, str(IMAGE),
         str(NUM_CROPS), str(MAX_NEW_TOKENS), PROMPT],
        env={"NODE_PATH": str(NODE_DIR / "node_modules")},
    )
    assert run.returncode == 0, run.stderr
    info_line, result_line = run.stdout.splitlines()
    assert json.loads(info_line)["contextLength"] == 4096
    result = json.loads(result_line)
    assert result["text"] == python_result.text
    assert (result["token_ids"], result["finish_reason"]) == (python_result.token_ids, "length")


# ----------------------------------------------------------------------------- buf lint / breaking

def test_buf_lint_clean() -> None:
    proc = _run([_need(BUF, "buf"), "lint", "proto"])  # what `make lint` runs
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_lint_config_waives_nothing() -> None:
    config = (ROOT / "proto" / "buf.yaml").read_text()
    assert "ignore" not in config and "except" not in config


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([_need("git", "git"), *args])


def _materialize_proto(rev: str, dest: Path) -> Path:
    """proto/ as committed at `rev`, written under dest."""
    archive = subprocess.run(
        [_need("git", "git"), "archive", "--format=tar", rev, "proto"], cwd=ROOT, capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "proto"


# The commit that froze visionchat.v1 (before it, the contract was still being drafted and never
# served anyone). Every later contract must stay wire-compatible with it.
FREEZE_SUBJECT = "proto: freeze the visionchat.v1 contract"


def _committed_revisions() -> list[str]:
    """HEAD (main) and every commit since the freeze that changed proto/, newest first (at most 20)."""
    head = _git("rev-parse", "--verify", "HEAD")
    if head.returncode != 0:
        pytest.fail("not a git checkout with commits: " + head.stderr)
    revs = [head.stdout.strip()]
    freeze = _git("log", "--format=%H", "--fixed-strings", f"--grep={FREEZE_SUBJECT}", "HEAD").stdout.split()
    if freeze:
        since = _git("log", "--format=%H", "-n", "20", f"{freeze[-1]}^..HEAD", "--", "proto").stdout.split()
        revs += [r for r in since if r not in revs]
    return revs


def test_buf_breaking_clean_against_committed_contract(tmp_path: Path) -> None:
    buf = _need(BUF, "buf")
    for rev in _committed_revisions():
        against = _materialize_proto(rev, tmp_path / rev)
        proc = _run([buf, "breaking", "proto", "--against", str(against)])
        assert proc.returncode == 0, f"proto/ breaks the contract of {rev}:\n{proc.stdout}{proc.stderr}"


SCRATCH_CHANGES = {
    # name: (old text, new text, rule buf must report; None = an additive change that must pass)
    "renumber_field": ("uint32 max_new_tokens = 1;", "uint32 max_new_tokens = 12;", "FIELD_NO_DELETE"),
    "change_field_type": ("float temperature = 2;", "double temperature = 2;", "FIELD_SAME_TYPE"),
    "remove_field": ("  bool ignore_eos = 9;\n", "", "FIELD_NO_DELETE"),
    "rename_field": ("uint32 completion_tokens = 3;", "uint32 output_tokens = 3;", "FIELD_SAME_NAME"),
    "unstream_rpc": (
        "returns (stream GenerateResponse);\n  // Token", "returns (GenerateResponse);\n  // Token", "RPC_SAME_SERVER_STREAMING"
    ),
    "rename_enum_value": ("FINISH_REASON_EOS = 1;", "FINISH_REASON_END = 1;", "ENUM_VALUE_SAME_NAME"),
    "add_field": ("  uint32 logprobs = 10;\n", "  uint32 logprobs = 10;\n  bool echo = 12;\n", None),
}


@pytest.mark.parametrize("change", sorted(SCRATCH_CHANGES))
def test_buf_breaking_catches_deliberate_break(change: str, tmp_path: Path) -> None:
    buf = _need(BUF, "buf")
    old, new, rule = SCRATCH_CHANGES[change]
    scratch = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", scratch)
    path = scratch / "visionchat" / "v1" / "visionchat.proto"
    text = path.read_text()
    assert text.count(old) == 1, f"scratch edit {change!r} no longer applies to the proto"
    path.write_text(text.replace(old, new))
    proc = _run([buf, "breaking", str(scratch), "--against", str(ROOT / "proto"), "--error-format", "json"])
    if rule is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0, f"{change} was not reported"
        assert rule in {json.loads(line)["type"] for line in proc.stdout.splitlines()}, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- grpcurl recipes

RECIPE = re.compile(r"<!-- recipe: (\S+) -->\s*```sh\n(.*?)```", re.S)
DOC_ADDRESS = "localhost:50051"
RECIPES = ["list", "describe", "get-model-info", "count-tokens", "generate", "generate-video", "chat"]
CLIP = ROOT / "tests" / "fixtures" / "clips" / "square_24f_12fps.mp4"


def _recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOCS.read_text()))


def test_docs_have_every_recipe() -> None:
    recipes = _recipes()
    assert sorted(recipes) == sorted(RECIPES), "every recipe in docs/clients.md needs its check below (and vice versa)"
    for name, command in recipes.items():
        assert command.lstrip().startswith("grpcurl ") and DOC_ADDRESS in command, name
    text = DOCS.read_text()
    for lang in ("Python", "Node.js", "Go", "Java", "C++", "TypeScript", "grpcurl"):
        assert f"\n### {lang}\n" in text, lang
    assert "## Calling VisionChat from your language" in text and "dns:///" in text and "round_robin" in text


def _generated(objs: list[dict[str, Any]]) -> tuple[str, list[int], str]:
    text, ids, finish = "", [], ""
    for obj in objs:
        delta = obj.get("delta", {})
        text += delta.get("text", "")
        ids += [t.get("token_id", 0) for t in delta.get("tokens", [])]
        finish = obj.get("finished", {}).get("finish_reason", finish)
    return text, ids, finish


@pytest.mark.parametrize("name", RECIPES)
def test_grpcurl_recipe(name: str, server: ServerProcess, python_result: ChatResult) -> None:
    grpcurl = _need(GRPCURL, "grpcurl")
    command = _recipes()[name]
    assert DOC_ADDRESS in command  # never let a recipe reach whatever listens on the real port
    proc = _run(
        ["bash", "-euo", "pipefail", "-c", command.replace(DOC_ADDRESS, server.address)],
        env={"PATH": f"{Path(grpcurl).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if name == "list":
        assert {"visionchat.v1.VisionChatService", "grpc.health.v1.Health"} <= set(out.split())
    elif name == "describe":
        assert "rpc Chat ( stream .visionchat.v1.ChatRequest ) returns ( stream .visionchat.v1.ChatResponse )" in out
        assert "rpc Generate ( .visionchat.v1.GenerateRequest ) returns ( stream .visionchat.v1.GenerateResponse )" in out
    elif name == "get-model-info":
        info = json.loads(out)
        assert info["context_length"] == 4096 and info["model_id"] == server.model_info().model_id
    elif name == "count-tokens":
        count = json.loads(out)
        with VisionChatClient(server.address) as client:
            expected = client.count_tokens(PROMPT, [IMAGE], num_crops=NUM_CROPS)
        assert (count["prompt_tokens"], count["image_tokens"]) == (expected.prompt_tokens, expected.image_tokens)
        assert count["prompt_tokens"] == python_result.usage.prompt_tokens
    elif name == "generate-video":  # the same greedy request through the Python client
        objs = _json_stream(out)
        _, ids, finish = _generated(objs)
        with VisionChatClient(server.address) as client:
            expected = client.generate(
                "Describe the video.", videos=[Video(CLIP, num_frames=4)], max_new_tokens=16, ignore_eos=True
            )
        assert (ids, finish) == (expected.token_ids, "FINISH_REASON_LENGTH")
        frames = objs[-1]["finished"]["videos"][0]["frames"]
        assert [f["frame_index"] for f in frames] == [3, 9, 15, 21]
    else:  # generate, chat: the same greedy request as the Python client's
        text, ids, finish = _generated(_json_stream(out))
        assert (text, ids, finish) == (python_result.text, python_result.token_ids, "FINISH_REASON_LENGTH")
