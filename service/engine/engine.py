"""The engine of one worker: schedule, run the model, apply the results. One call to `step` is one
forward pass over every request that makes progress in it, and returns everything that step did."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..context_limit import context_problem
from ..model import Phi3VForCausalLM
from ..model.attention import AttentionBackend
from ..platform.base import Platform
from ..structured import Grammars
from .block_pool import BlockPool
from .encoder_cache import EncoderCache, EncoderCacheStats
from .errors import RequestFailed, RequestRefused
from .kv_cache import KVCache, KVCacheSpec, blocks_needed
from .model_runner import ModelRunner, RunnerOutput
from .request import EngineRequest, FinishReason, RequestOutput, TokenOutput
from .scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from .sequence import Sequence


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    kv_cache_memory_bytes: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_vision_crops: int = 16  # tiles per vision-tower forward (micro-batch)
    vision_tiles_per_step: int = 1 << 30  # tiles encoded per engine step
    max_image_embed_tokens: int = 32768  # encoder-cache capacity in embedding rows


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
    problem = context_problem(prompt_len, max_new_tokens, max_model_len)
    if problem:
        raise RequestRefused(
            "max_context_tokens" if problem[0] != "messages" else "max_context_tokens_prompt", problem[1]
        )
    total = prompt_len + max_new_tokens
    need = blocks_needed(total, block_size)
    if need > num_blocks:
        prompt_blocks = blocks_needed(prompt_len, block_size)
        blame = "kv_cache_memory_prompt" if prompt_blocks > num_blocks else "kv_cache_memory"
        raise RequestRefused(
            blame,
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
    encoder_cache: EncoderCacheStats | None = None
    num_oom_preemptions: int = 0  # also counted in num_preemptions


@dataclass(frozen=True)
class StepTimings:
    num_tokens: int = 0
    num_decode_tokens: int = 0
    num_tiles: int = 0  # vision-tower tiles encoded
    num_images_encoded: int = 0  # images whose last tile was encoded in the step
    vision_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)


class Engine:
    def __init__(
        self,
        model: Phi3VForCausalLM,
        config: EngineConfig,
        backend: AttentionBackend,
        platform: Platform | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.model = model
        self.grammars = grammars  # response formats (structured outputs); None: refused
        self.config = config
        # What differs per device kind: how step inputs reach the device, what an out-of-memory error is.
        self.platform = platform or Platform(model.device)
        self.num_oom_preemptions = 0
        spec = KVCacheSpec.for_model(model.config, config.block_size, model.dtype)
        num_blocks = spec.num_blocks_for(config.kv_cache_memory_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory {config.kv_cache_memory_bytes} bytes holds no KV block "
                f"(one block of {config.block_size} tokens needs {spec.bytes_per_block} bytes)"
            )
        self.kv_cache = KVCache(spec, num_blocks, model.device, backend)
        self.pool = BlockPool(num_blocks)
        self.encoder_cache = EncoderCache(config.max_image_embed_tokens)
        self.scheduler = Scheduler(
            self.pool,
            self.encoder_cache,
            SchedulerLimits(
                config.max_num_batched_tokens,
                config.max_num_seqs,
                config.block_size,
                max(1, config.vision_tiles_per_step),
            ),
        )
        self.runner = ModelRunner(model, self.kv_cache, backend, config.max_vision_crops, self.platform.upload)
        self.sequences: dict[str, Sequence] = {}

    def set_vision_tiles_per_step(self, tiles: int) -> None:
        """Bound each step's vision work (decided after the warm-up measured the vision tower)."""
        self.config = dataclasses.replace(self.config, vision_tiles_per_step=tiles)
        self.scheduler.limits = dataclasses.replace(self.scheduler.limits, vision_tiles_per_step=max(1, tiles))

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free,
            block_size=self.config.block_size,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            num_cached_blocks=self.pool.num_cached,
            encoder_cache=self.encoder_cache.stats(),
            num_oom_preemptions=self.num_oom_preemptions,
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
        fmt = request.sampling.response_format
        if fmt is not None:
            if self.grammars is None:
                raise RequestRefused("response_format", "this worker serves no response formats")
            try:
                seq.matcher = self.grammars.matcher(fmt)
            except ValueError as exc:
                raise RequestRefused("response_format", f"the response format cannot be used: {exc}") from exc
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(
        self, request_id: str, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None
    ) -> RequestOutput | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return RequestOutput(
            request_id,
            finish_reason=reason,
            error=error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        opts = seq.request.sampling
        if token in opts.eos_token_ids:
            return FinishReason.EOS
        if token in opts.stop_token_ids:
            return FinishReason.STOP_TOKEN
        if seq.num_output_tokens >= opts.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _inputs_from_cache(
        self, plan: SchedulerOutput
    ) -> tuple[dict[bytes, torch.Tensor], dict[bytes, list[torch.Tensor]]]:
        """The complete embeddings the step's chunks read and the partial tile features of the images
        its vision work completes."""
        embeds: dict[bytes, torch.Tensor] = {}
        for chunk in plan.chunks:
            for index in chunk.seq.pinned_images:
                key = chunk.seq.request.images[index].key
                if key not in embeds and self.encoder_cache.is_complete(key):
                    embeds[key] = self.encoder_cache.embeds(key)
        partial = {
            w.image.key: self.encoder_cache.partial_features(w.image.key)
            for w in plan.encodes
            if w.completes_image and w.tile_lo > 0
        }
        return embeds, partial

    def step(self) -> StepResult:
        while True:
            plan = self.scheduler.schedule()
            if not plan:
                return StepResult()
            embeds, partial = self._inputs_from_cache(plan)
            try:
                ran = self.runner.execute(plan, embeds, partial)
            except RequestFailed as exc:
                failed = self.abort(exc.request_id, FinishReason.ERROR, str(exc))
                return StepResult([failed] if failed else [])
            except Exception as exc:
                if not self.platform.is_out_of_memory(exc):
                    raise
                # The runner changed no sequence: give the step less to do and run it again, as a
                # preemption would (the newest sequence is recomputed later), instead of dying.
                self.platform.empty_cache()
                outputs = self._shed_for_memory(exc)
                if outputs:
                    return StepResult(outputs)
                continue
            self.scheduler.step_ran()
            return StepResult(self._apply(plan, ran), self._timings(ran))

    def _shed_for_memory(self, exc: BaseException) -> list[RequestOutput]:
        """Preempt the newest running sequence; with one left, fail it (it alone does not fit)."""
        running = self.scheduler.running
        if len(running) > 1:
            self.scheduler.shrink_for_memory()
            self.num_oom_preemptions += 1
            return []
        if not running:
            raise exc
        failed = self.abort(running[0].request_id, FinishReason.ERROR, f"out of device memory even alone: {exc}")
        return [failed] if failed else []

    def _timings(self, ran: RunnerOutput) -> StepTimings:
        return StepTimings(
            num_tokens=ran.num_tokens,
            num_decode_tokens=ran.num_decode_tokens,
            num_tiles=ran.num_tiles,
            num_images_encoded=len(ran.completed_images),
            vision_seconds=ran.vision_seconds,
            forward_seconds=ran.forward_seconds,
            sample_seconds=ran.sample_seconds,
        )

    def _apply(self, plan: SchedulerOutput, ran: RunnerOutput) -> list[RequestOutput]:
        """The engine alone updates its state: the encoder cache, each sequence's progress, the prefix
        cache, and the sampled tokens."""
        for key, lo, features in ran.tile_features:
            self.encoder_cache.add_tiles(key, lo, features)
        for key, rows in ran.completed_images.items():
            self.encoder_cache.complete(key, rows)
        for chunk in plan.chunks:
            seq = chunk.seq
            if chunk.num_tokens == 0:
                continue
            seq.num_computed_tokens += chunk.num_tokens
            seq.kv_long_rope = seq.wants_long_rope
            self.scheduler.release_consumed_images(seq)
            self.scheduler.cache_full_blocks(seq)
        return [self._record(seq, token) for seq, token in ran.sampled]

    def _record(self, seq: Sequence, token: TokenOutput) -> RequestOutput:
        seq.token_ids.append(token.token_id)
        violation = ""
        if seq.matcher is not None and not seq.matcher.consume_token(token.token_id):
            violation = seq.matcher.get_error() or "a token outside the response format"  # never with the mask
        out = RequestOutput(
            seq.request_id,
            tokens=[token],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if not seq.queue_reported and seq.first_scheduled_time is not None:
            out.queue_seconds = max(0.0, seq.first_scheduled_time - seq.request.arrival_time)
            seq.queue_reported = True
        reason = self._stop_reason(seq, token.token_id)
        if violation:
            reason, out.error = FinishReason.ERROR, f"response format violated: {violation}"
        elif reason is None and seq.matcher is not None and seq.matcher.is_stopped():
            reason = FinishReason.GRAMMAR_COMPLETE
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
            for out in self.step().outputs:
                outputs[out.request_id].extend(t.token_id for t in out.tokens)
        return outputs
