"""The embedded default model: a tiny random-weight Phi-3.5-vision that the server runs out of the box.

No weights can be downloaded, so `visionchat` without `--model` serves a checkpoint it makes itself:
the real tokenizer and processor files (shipped in `service/assets/default_model/`, MIT licence,
from microsoft/Phi-3.5-vision-instruct) with the parity fixture's tiny config, and random weights
written once by `write_random_checkpoint` into a cache folder. The folder has the real Hugging Face
layout (two shards with a decoder layer spanning both, like the fixture), so serving it exercises
exactly the code path of the real checkpoint. Text from it is gibberish, by construction.

The cache folder name carries a hash of everything that determines its bytes (asset files, seed,
shard limit, format version), so a changed asset or writer never reuses stale weights. It is built
in a temporary folder and renamed into place: rename is atomic, so concurrently starting servers
either see a complete folder or none, and the loser of a race simply uses the winner's copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint_writer import INDEX_FILE, write_random_checkpoint

ASSET_DIR = Path(__file__).parent / "assets" / "default_model"
ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
SEED = 1729
# Two shards split like the fixture's (the first closes inside decoder layer 1), so the default model
# also proves that the loader follows the index instead of assuming one layer per file.
MAX_SHARD_BYTES = 14_000_000
DTYPE = torch.bfloat16
# Bump whenever write_random_checkpoint would write different bytes for the same inputs.
FORMAT_VERSION = 1


def default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "visionchat"


def fingerprint() -> str:
    """Short hash of everything that determines the folder's bytes."""
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION};seed={SEED};shard={MAX_SHARD_BYTES};dtype={DTYPE}\n".encode())
    for name in ASSET_FILES:
        data = (ASSET_DIR / name).read_bytes()
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:12]


def _is_complete(folder: Path) -> bool:
    if not folder.is_dir() or not (folder / INDEX_FILE).is_file():
        return False
    if not all((folder / name).is_file() for name in ASSET_FILES):
        return False
    try:
        shards = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / shard).is_file() for shard in shards)


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The embedded default model's folder, written on first use (about 27 MB, well under a second).

    `cache_dir` defaults to `$XDG_CACHE_HOME/visionchat` or `~/.cache/visionchat`.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"default-model-{fingerprint()}"
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        config = json.loads((ASSET_DIR / "config.json").read_text())
        write_random_checkpoint(tmp, config, seed=SEED, max_shard_bytes=MAX_SHARD_BYTES, dtype=DTYPE)
        # The asset files verbatim (config.json included: same content, original key order).
        for name in ASSET_FILES:
            shutil.copyfile(ASSET_DIR / name, tmp / name)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            tmp.rename(final)
        except OSError:
            # Renaming onto an existing non-empty folder fails: another process finished first.
            if not _is_complete(final):
                raise RuntimeError(
                    f"{final}: exists but is not a complete default model; delete it and start again"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
