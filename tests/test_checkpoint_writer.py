"""The random-checkpoint writer and the embedded default model built with it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service import default_model
from service.checkpoint_writer import INDEX_FILE, checkpoint_tensors, write_random_checkpoint
from service.default_model import ensure_default_model
from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions
from service.model import load_model, select_attention_backend

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-phi35v"
CPU = torch.device("cpu")
FIXTURE_SHARD_LIMIT = 14_000_000  # reproduces the fixture's split (70 + 6 tensors)


@pytest.fixture(scope="module")
def fixture_config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def written(tmp_path_factory, fixture_config) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("w") / "a", fixture_config, seed=11, max_shard_bytes=FIXTURE_SHARD_LIMIT
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_layout_names_shapes_and_split_match_the_original(written: Path) -> None:
    # Same tensor names, shapes, shard split and index bytes as the checkpoint of the original code.
    assert (written / INDEX_FILE).read_text() == (FIXTURE / INDEX_FILE).read_text()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        ours, theirs = load_file(written / shard), load_file(FIXTURE / shard)
        assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    stored = {**load_file(written / "model-00001-of-00002.safetensors")}
    assert "model.vision_embed_tokens.wte.weight" not in stored
    assert torch.count_nonzero(stored["model.embed_tokens.weight"][32000]) == 0  # pad row


def test_shards_are_what_safetensors_itself_writes(written: Path, tmp_path: Path) -> None:
    # The streaming writer lays out header and data exactly like safetensors.torch.save_file.
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file(load_file(written / shard), tmp_path / shard, metadata={"format": "pt"})
        assert (tmp_path / shard).read_bytes() == (written / shard).read_bytes()


def test_same_seed_same_bytes_other_seed_other_weights(written: Path, tmp_path: Path, fixture_config) -> None:
    again = write_random_checkpoint(tmp_path / "b", fixture_config, seed=11, max_shard_bytes=FIXTURE_SHARD_LIMIT)
    assert _files(again) == _files(written)
    other = write_random_checkpoint(tmp_path / "c", fixture_config, seed=12, max_shard_bytes=FIXTURE_SHARD_LIMIT)
    a = load_file(written / "model-00002-of-00002.safetensors")["lm_head.weight"]
    b = load_file(other / "model-00002-of-00002.safetensors")["lm_head.weight"]
    assert not torch.equal(a, b)


def test_tensor_values_do_not_depend_on_the_split(written: Path, tmp_path: Path, fixture_config) -> None:
    single = write_random_checkpoint(tmp_path / "single", fixture_config, seed=11, max_shard_bytes=1 << 40)
    whole = load_file(single / "model.safetensors")
    parts = {
        **load_file(written / "model-00001-of-00002.safetensors"),
        **load_file(written / "model-00002-of-00002.safetensors"),
    }
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_index_total_size_and_state_dict_order(written: Path, fixture_config) -> None:
    specs = checkpoint_tensors(fixture_config)
    index = json.loads((written / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(s.numel for s in specs) * 2
    names = [s.name for s in specs]
    tower = "model.vision_embed_tokens.img_processor.vision_model."
    # The last CLIP layer (not in the serving model) sits between layer 1 and post_layernorm.
    first_of_last = names.index(f"{tower}encoder.layers.2.self_attn.k_proj.weight")
    assert first_of_last == names.index(f"{tower}encoder.layers.1.layer_norm2.bias") + 1
    assert names.index(f"{tower}post_layernorm.weight") == names.index(f"{tower}encoder.layers.2.layer_norm2.bias") + 1
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_real_dimensions_plan_without_writing() -> None:
    """The full-size config (no vision_config: CLIP ViT-L/14-336) gives the real checkpoint's tensors."""
    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.update(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    )
    cfg["img_processor"] = {k: v for k, v in cfg["img_processor"].items() if k != "vision_config"}
    cfg["img_processor"]["image_dim_out"] = 1024
    specs = checkpoint_tensors(cfg)
    params = sum(s.numel for s in specs)
    # embed_tokens; tower: embeddings 3, pre_layrnorm 2, 24 layers x 16, post_layernorm 2; separators 2;
    # projector 4; 32 decoder layers x 6; norm; lm_head.
    assert len(specs) == 1 + (3 + 2 + 24 * 16 + 2) + 2 + 4 + 32 * 6 + 1 + 1
    assert params == 4_146_621_440  # the "4.2B" of Phi-3.5-vision-instruct
    by_name = {s.name: s.shape for s in specs}
    tower = "model.vision_embed_tokens.img_processor.vision_model."
    assert by_name[f"{tower}encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert by_name["model.vision_embed_tokens.sub_GN"] == (1, 1, 1, 4096)


def test_rewriting_a_loaded_checkpoint_leaves_the_loaded_model_alone(tmp_path: Path, fixture_config) -> None:
    # On CPU with the checkpoint's dtype the loaded weights are views of the mapped shard files.
    # Rewriting the folder (new seed) must neither crash that process (SIGBUS on a truncated
    # mapping) nor change its weights under it: shards are replaced by rename, never in place.
    folder = write_random_checkpoint(tmp_path / "m", fixture_config, seed=1, max_shard_bytes=FIXTURE_SHARD_LIMIT)
    model, _ = load_model(folder, torch.bfloat16, CPU, progress=False)
    before = model.lm_head.weight.clone()
    write_random_checkpoint(folder, fixture_config, seed=2, max_shard_bytes=FIXTURE_SHARD_LIMIT)
    assert torch.equal(model.lm_head.weight, before)
    assert not torch.equal(load_file(folder / "model-00002-of-00002.safetensors")["lm_head.weight"], before)
    assert not list(folder.glob("*.partial"))


# ---------------------------------------------------------------------------------------------------
# The embedded default model


def test_default_model_is_built_once_and_loads(tmp_path: Path) -> None:
    folder = ensure_default_model(tmp_path)
    assert folder.parent == tmp_path and folder.name == f"default-model-{default_model.fingerprint()}"
    for name in default_model.ASSET_FILES:
        assert (folder / name).read_bytes() == (default_model.ASSET_DIR / name).read_bytes()
    assert json.loads((folder / "config.json").read_text())["_name_or_path"] == "visionchat-embedded-tiny-random"
    assert len(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())) == 2
    assert not list(folder.glob("*.py"))

    stamp = (folder / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == folder
    assert (folder / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folders left

    # Through the ordinary loader; greedy text depends on the prompt.
    model, _ = load_model(folder, torch.float32, CPU, progress=False)
    config = EngineConfig(max_model_len=256, kv_cache_memory_bytes=8 << 20)
    engine = Engine(model, config, select_attention_backend("auto", CPU))
    greedy = SamplingOptions(max_new_tokens=8)
    requests = [
        EngineRequest(str(i), (1, 32010, 29871, 13, *ids, 32007, 32001), (), greedy, time.time())
        for i, ids in enumerate([(15043,), (4002, 29581, 445), (1724, 338, 29871, 29906)])
    ]
    out = engine.run_to_completion(requests)
    assert len({tuple(v) for v in out.values()}) == 3
    assert all(len(set(v)) > 3 for v in out.values())


def test_default_model_cache_location(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.default_cache_root() == tmp_path / "xdg" / "visionchat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.default_cache_root() == tmp_path / "home" / ".cache" / "visionchat"


def test_default_model_concurrent_builders_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_default_model(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert sorted(os.listdir(tmp_path)) == [results[0].name]


def test_default_model_hash_follows_the_assets(tmp_path: Path, monkeypatch) -> None:
    before = default_model.fingerprint()
    monkeypatch.setattr(default_model, "SEED", default_model.SEED + 1)
    assert default_model.fingerprint() != before
