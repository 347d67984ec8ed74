"""The engine of one worker: schedule, run the model, sample, report. One call to `step` is one
forward pass over every request that makes progress in it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Phi3VForCausalLM
from ..model.attention import AttentionBackend
from .block_pool import BlockPool
from .kv_cache import KVCache, KVCacheSpec, blocks_needed
from .errors import RequestFailed, RequestRefused
from .model_runner import ModelRunner, StepStats
from .request import EngineRequest, FinishReason, RequestOutput, TokenOutput
from .sampler import SamplingRow, sample
from .scheduler import Scheduler, SchedulerLimits
from .sequence import Sequence


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    kv_cache_memory_bytes: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_vision_crops: int = 32
    max_image_embed_tokens: int = 32768


def check_fits(
    prompt_len: int,
    max_new_tokens: int,
    max_model_len: int,
    num_blocks: int,
    block_size: int,
    largest_image_tokens: int = 0,
    max_image_embed_tokens: int = 1 << 30,
) -> None:
    """Refuse a request that could never run, whatever else finishes first."""
    if largest_image_tokens > max_image_embed_tokens:
        raise RequestRefused(
            "max_image_embed_tokens",
            f"an image of {largest_image_tokens} tokens exceeds the image-embedding budget of "
            f"{max_image_embed_tokens} tokens (--max-image-embed-tokens)",
        )
    total = prompt_len + max_new_tokens
    if total > max_model_len:
        raise RequestRefused(
            "max_context_tokens",
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"context limit of {max_model_len} tokens",
        )
    need = blocks_needed(total, block_size)
    if need > num_blocks:
        raise RequestRefused(
            "kv_cache_memory",
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs {need} KV blocks of "
            f"{block_size} tokens; the worker's KV pool has {num_blocks} blocks ({num_blocks * block_size} tokens)",
        )


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_total: int
    kv_blocks_free: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_cached_blocks: int = 0


class Engine:
    def __init__(self, model: Phi3VForCausalLM, config: EngineConfig, backend: AttentionBackend) -> None:
        self.model = model
        self.config = config
        spec = KVCacheSpec.for_model(model.config, config.block_size, model.dtype)
        num_blocks = spec.num_blocks_for(config.kv_cache_memory_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory {config.kv_cache_memory_bytes} bytes holds no KV block "
                f"(one block of {config.block_size} tokens needs {spec.bytes_per_block} bytes)"
            )
        self.kv_cache = KVCache(spec, num_blocks, model.device)
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(
            self.pool, SchedulerLimits(config.max_num_batched_tokens, config.max_num_seqs, config.block_size, config.max_image_embed_tokens)
        )
        self.runner = ModelRunner(model, self.kv_cache, backend, config.max_vision_crops)
        self.sequences: dict[str, Sequence] = {}
        self.last_step = StepStats()

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free,
            block_size=self.config.block_size,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            num_cached_blocks=self.pool.num_cached,
        )

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def check_fits(self, request: EngineRequest) -> None:
        check_fits(
            len(request.prompt_ids),
            request.sampling.max_new_tokens,
            self.config.max_model_len,
            self.pool.num_blocks,
            self.config.block_size,
            max((img.num_tokens for img in request.images), default=0),
            self.config.max_image_embed_tokens,
        )

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.sequences:
            raise RequestRefused("request_id", f"request id {request.request_id!r} is already running")
        self.check_fits(request)
        seq = Sequence(request, self.model.config.original_max_position_embeddings)
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None) -> RequestOutput | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return RequestOutput(request_id, finish_reason=reason, error=error, num_prompt_tokens=seq.num_prompt_tokens)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        opts = seq.request.sampling
        if token in opts.eos_token_ids:
            return FinishReason.EOS
        if token in opts.stop_token_ids:
            return FinishReason.STOP_TOKEN
        if seq.num_output_tokens >= opts.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def step(self) -> list[RequestOutput]:
        self.last_step = StepStats()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        try:
            sampling_chunks, logits, self.last_step = self.runner.execute(chunks)
        except RequestFailed as exc:
            failed = self.abort(exc.request_id, FinishReason.ERROR, str(exc))
            return [failed] if failed else []
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            chunk.seq.release_consumed_images()
            self.scheduler.cache_full_blocks(chunk.seq)

        rows = [SamplingRow(c.seq.request.sampling, c.seq.token_ids, c.seq.generator) for c in sampling_chunks]
        tokens = sample(logits, rows) if rows else []
        return [self._record(chunk.seq, token) for chunk, token in zip(sampling_chunks, tokens)]

    def _record(self, seq: Sequence, token: TokenOutput) -> RequestOutput:
        seq.token_ids.append(token.token_id)
        out = RequestOutput(seq.request_id, tokens=[token], num_prompt_tokens=seq.num_prompt_tokens)
        if not seq.queue_reported and seq.first_scheduled_time is not None:
            out.queue_seconds = max(0.0, seq.first_scheduled_time - seq.request.arrival_time)
            out.num_cached_tokens = seq.num_cached_tokens
            seq.queue_reported = True
        reason = self._stop_reason(seq, token.token_id)
        if reason is not None:
            out.finish_reason = reason
            self.sequences.pop(seq.request_id, None)
            self.scheduler.remove(seq)
        return out

    @torch.inference_mode()
    def run_to_completion(self, requests: list[EngineRequest]) -> dict[str, list[int]]:
        """The minimal generate loop: add requests, step until all finish, return output ids by request."""
        for request in requests:
            self.add_request(request)
        outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
        while self.has_work():
            for out in self.step():
                outputs[out.request_id].extend(t.token_id for t in out.tokens)
        return outputs
