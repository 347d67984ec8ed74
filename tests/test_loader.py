"""Checkpoint loader: what loads, what fails, and that every failure names the file and tensor.

Checkpoints are written by `write_random_checkpoint` with a very small config into tmp_path; each
test breaks one thing the way a damaged download or a wrong folder would.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from service.checkpoint_writer import INDEX_FILE, SINGLE_FILE, write_random_checkpoint
from service.model import CheckpointError, ModelConfigError, load_model, resolve_dtype

FIXTURE_CONFIG = Path(__file__).parent / "fixtures" / "tiny-phi35v" / "config.json"
CPU = torch.device("cpu")
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
EMBED = "model.embed_tokens.weight"
QKV_1 = "model.layers.1.self_attn.qkv_proj.weight"


def tiny_config() -> dict[str, Any]:
    """The fixture's config (real rope factors, head_dim 96) made smaller still: 1 head, small vocab."""
    cfg = json.loads(FIXTURE_CONFIG.read_text())
    cfg.update(hidden_size=96, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1, vocab_size=512)
    cfg["img_processor"]["image_dim_out"] = 32
    cfg["img_processor"]["vision_config"].update(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2
    )
    return cfg


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two shards, split inside decoder layer 1 like the real fixture (embeddings alone fill shard 1's budget)."""
    cfg = tiny_config()
    out = write_random_checkpoint(tmp_path / "ckpt", cfg, seed=3, max_shard_bytes=_split_after(cfg, QKV_1))
    assert {p.name for p in out.glob("*.safetensors")} == {SHARD_1, SHARD_2}
    return out


def _split_after(cfg: dict[str, Any], name: str) -> int:
    """The shard limit that closes shard 1 right after tensor `name` (state_dict order)."""
    from service.checkpoint_writer import checkpoint_tensors

    size = 0
    for spec in checkpoint_tensors(cfg):
        size += spec.numel * 2
        if spec.name == name:
            return size
    raise AssertionError(name)


def _index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INDEX_FILE).read_text())


def _rewrite_shard(folder: Path, shard: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Load a shard, let `edit` change its dict of tensors, save it back (and fix the index)."""
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index = _index(folder)
    weight_map = {k: v for k, v in index["weight_map"].items() if v != shard}
    weight_map.update({k: shard for k in tensors})
    index["weight_map"] = weight_map
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


# ---------------------------------------------------------------------------------------------------
# What loads


def test_sharded_checkpoint_loads_bf16_to_fp32(sharded: Path) -> None:
    # Layer 1 spans both files: the loader must follow the index.
    index = _index(sharded)["weight_map"]
    assert index[QKV_1] == SHARD_1 and index["model.layers.1.mlp.down_proj.weight"] == SHARD_2

    model, report = load_model(sharded, torch.float32, CPU, progress=False)
    stored = _stored(sharded)
    params = dict(model.named_parameters())
    assert report.num_tensors == len(params)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    # Upcasting bf16 to fp32 is exact.
    assert torch.equal(model.model.embed_tokens.weight, stored[EMBED].float())
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, stored[QKV_1].float())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_fp32_checkpoint_loads_as_bf16(tmp_path: Path) -> None:
    folder = write_random_checkpoint(
        tmp_path / "fp32", tiny_config(), seed=4, max_shard_bytes=1 << 30, dtype=torch.float32
    )
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    model, _ = load_model(folder, torch.bfloat16, CPU, progress=False)
    stored = _stored(folder)
    assert stored[EMBED].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.model.embed_tokens.weight, stored[EMBED].to(torch.bfloat16))


def test_single_file_layout_loads(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "single", tiny_config(), seed=5, max_shard_bytes=1 << 30)
    assert (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).exists()
    assert not list(folder.glob("model-*.safetensors"))
    model, _ = load_model(folder, torch.float32, CPU, progress=False)
    assert torch.equal(model.lm_head.weight, load_file(folder / SINGLE_FILE)["lm_head.weight"].float())


def test_wte_alias_is_accepted(sharded: Path) -> None:
    # The original's state_dict lists the shared embedding twice; a checkpoint that kept it is valid.
    _rewrite_shard(sharded, SHARD_1, lambda t: t.update({"model.vision_embed_tokens.wte.weight": t[EMBED].clone()}))
    model, _ = load_model(sharded, torch.float32, CPU, progress=False)
    assert torch.equal(model.model.embed_tokens.weight, load_file(sharded / SHARD_1)[EMBED].float())


def test_unused_last_clip_layer_and_post_layernorm_are_stored_and_skipped(sharded: Path) -> None:
    stored = _stored(sharded)
    tower = "model.vision_embed_tokens.img_processor.vision_model."
    assert f"{tower}encoder.layers.1.mlp.fc1.weight" in stored  # the last of 2 layers: never computed
    assert f"{tower}post_layernorm.weight" in stored
    model, _ = load_model(sharded, torch.float32, CPU, progress=False)
    # The serving tower holds only layer 0 (hidden_states[-2] of a 2-layer tower).
    names = [n for n, _ in model.named_parameters() if "encoder.layers." in n]
    layers = {n.split("encoder.layers.")[1].split(".")[0] for n in names}
    assert layers == {"0"}


def test_loading_never_runs_python_from_the_folder(sharded: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-was-run"
    payload = (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "raise RuntimeError('remote code executed')\n"
    )
    remote_code = (
        "modeling_phi3_v.py", "configuration_phi3_v.py", "image_processing_phi3_v.py", "processing_phi3_v.py"
    )
    for name in (*remote_code, "__init__.py"):
        (sharded / name).write_text(payload)
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    }
    (sharded / "config.json").write_text(json.dumps(cfg))
    load_model(sharded, torch.float32, CPU, progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# What fails, and how it says so


def test_missing_shard_file(sharded: Path) -> None:
    (sharded / SHARD_2).unlink()
    with pytest.raises(CheckpointError, match=SHARD_2):
        load_model(sharded, torch.float32, CPU, progress=False)


def test_no_weights_at_all(sharded: Path) -> None:
    for shard in (SHARD_1, SHARD_2, INDEX_FILE):
        (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        load_model(sharded, torch.float32, CPU, progress=False)


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_truncated_safetensors_header(layout: str, sharded: Path, tmp_path: Path) -> None:
    if layout == "sharded":
        folder, broken = sharded, SHARD_2
    else:
        folder = write_random_checkpoint(tmp_path / "single", tiny_config(), seed=5, max_shard_bytes=1 << 30)
        broken = SINGLE_FILE
    data = (folder / broken).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    (folder / broken).write_bytes(data[: 8 + header_len // 2])  # the header stops half-way
    with pytest.raises(CheckpointError, match=broken) as err:
        load_model(folder, torch.float32, CPU, progress=False)
    assert "safetensors" in str(err.value)


def test_tensor_with_wrong_shape(sharded: Path) -> None:
    _rewrite_shard(sharded, SHARD_1, lambda t: t.update({QKV_1: t[QKV_1][:-1].clone()}))
    with pytest.raises(CheckpointError, match=SHARD_1) as err:
        load_model(sharded, torch.float32, CPU, progress=False)
    assert QKV_1 in str(err.value) and "[287, 96]" in str(err.value) and "[288, 96]" in str(err.value)


def test_unknown_tensor(sharded: Path) -> None:
    stray = "model.layers.1.self_attn.rotary_emb.inv_freq"  # what some old exports carry
    _rewrite_shard(sharded, SHARD_2, lambda t: t.update({stray: torch.zeros(48)}))
    with pytest.raises(CheckpointError, match=SHARD_2) as err:
        load_model(sharded, torch.float32, CPU, progress=False)
    assert "unknown tensor" in str(err.value) and "rotary_emb.inv_freq" in str(err.value)


def test_missing_tensor(sharded: Path) -> None:
    _rewrite_shard(sharded, SHARD_2, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="model.norm.weight") as err:
        load_model(sharded, torch.float32, CPU, progress=False)
    assert "missing" in str(err.value)


def test_tensor_in_index_but_not_in_shard(sharded: Path) -> None:
    tensors = load_file(sharded / SHARD_2)
    del tensors["model.norm.weight"]
    save_file(tensors, sharded / SHARD_2, metadata={"format": "pt"})  # the index still lists it
    with pytest.raises(CheckpointError, match=SHARD_2) as err:
        load_model(sharded, torch.float32, CPU, progress=False)
    assert "model.norm.weight" in str(err.value)


def test_unsupported_model_type(sharded: Path) -> None:
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["model_type"] = "llama"
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="model_type='llama'"):
        load_model(sharded, torch.float32, CPU, progress=False)


def test_missing_config(sharded: Path) -> None:
    (sharded / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="config.json"):
        load_model(sharded, torch.float32, CPU, progress=False)


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="int3"):
        resolve_dtype("int3", CPU)
    assert resolve_dtype("bf16", CPU) is torch.bfloat16
    assert resolve_dtype("auto", CPU) is torch.float32


def test_safe_open_sees_writer_metadata(sharded: Path) -> None:
    # save_pretrained stamps {"format": "pt"}; some tools refuse files without it.
    with safe_open(str(sharded / SHARD_1), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
