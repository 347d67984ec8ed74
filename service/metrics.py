"""Prometheus metrics, all kept in the frontend process.

Workers never touch Prometheus: every step report already carries what happened in that step, and
the frontend turns it into counters and histograms. So nothing is double counted, nothing is lost
when a worker restarts (its counts so far are already in the frontend), and there is no
multiprocess-collector directory to manage. Names follow vLLM's where the meaning is the same,
with a `visionchat_` prefix.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .engine import EngineStats
from .worker.handle import WorkerHandle
from .worker.protocol import StepReport, WorkerReady

# Up to 43 minutes: a CPU worker can take minutes to a first token (many frames through a full-size
# vision tower, a long queue), and a p99 stuck in the +Inf bucket says nothing.
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
)
# Whole requests and streams: up to about two hours (vLLM's top bucket is 7680 s too).
MAX_TENANT_LABELS = 100  # distinct tenant label values; more are counted as "other"
REQUEST_BUCKETS = LATENCY_BUCKETS + (5120.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        w = ["worker"]
        p = "visionchat_"
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Time from arrival to the last token",
            w,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            p + "request_queue_time_seconds",
            "Time from arrival until first scheduled on a worker",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            p + "request_prefill_time_seconds",
            "Time from first scheduled to the first token",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            p + "request_decode_time_seconds",
            "Time from the first token to the last",
            w,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.vision = Histogram(
            p + "vision_encoder_time_per_image_seconds",
            "Vision tower time per image (step vision time / images in the step)",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_hist = Histogram(
            p + "request_prompt_tokens",
            "Prompt tokens per request (image tokens included)",
            w,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.image_tokens_hist = Histogram(
            p + "request_image_tokens", "Image tokens per request", w, buckets=TOKEN_BUCKETS, registry=r
        )
        self.generation_tokens_hist = Histogram(
            p + "request_generation_tokens", "Generated tokens per request", w, buckets=TOKEN_BUCKETS, registry=r
        )
        self.step_tokens = Histogram(
            p + "iteration_tokens",
            "Tokens per engine step (decode + prefill)",
            w,
            buckets=STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            p + "engine_step_seconds",
            "Wall time of an engine step in the worker (scheduling, vision, forward, sampling, bookkeeping)",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            p + "model_forward_seconds",
            "Wall time of an engine step's model forward and sampling (vision excluded)",
            w,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.running = Gauge(p + "num_requests_running", "Requests in a worker's running batch", w, registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued in a worker, not yet running", w, registry=r)
        self.frontend_waiting = Gauge(
            p + "num_requests_waiting_frontend",
            "Requests accepted by the frontend that have not produced a token yet",
            registry=r,
        )
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", w, registry=r)
        self.kv_free = Gauge(p + "kv_cache_free_blocks", "Free KV-cache blocks", w, registry=r)
        self.kv_cached = Gauge(
            p + "prefix_cache_blocks",
            "KV-cache blocks whose content is kept for prefix reuse (held or free)",
            w,
            registry=r,
        )
        self.kv_total = Gauge(p + "kv_cache_total_blocks", "KV-cache blocks in the pool", w, registry=r)
        self.workers_alive = Gauge(p + "workers_alive", "Worker processes that are up and ready", registry=r)
        self.preprocess_pending = Gauge(
            p + "preprocess_queue_requests", "Requests queued or running in the preprocessing pool", registry=r
        )
        self.pixel_memory = Gauge(
            p + "pixel_memory_bytes",
            "Preprocessed image crops held in shared memory for requests in flight",
            registry=r,
        )
        self.uploads = Gauge(p + "uploads_in_progress", "Chat uploads in progress", registry=r)
        self.encoder_cache_rows = Gauge(
            p + "encoder_cache_rows",
            "Image embedding rows a worker's encoder cache holds (in use or kept for reuse)",
            w,
            registry=r,
        )

        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", w, registry=r)
        self.cached_tokens = Counter(
            p + "prefix_cache_hit_tokens",
            "Prompt tokens of finished requests whose KV came from the prefix cache",
            w,
            registry=r,
        )
        self.image_tokens = Counter(p + "image_tokens", "Image tokens of finished requests", w, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", w, registry=r)
        self.finished = Counter(
            p + "request_success", "Requests finished, by finish reason", ["worker", "finished_reason"], registry=r
        )
        self.failed = Counter(
            p + "request_failures", "Requests that ended with a gRPC error, by code", ["code"], registry=r
        )
        self.preemptions = Counter(
            p + "num_preemptions", "Sequences preempted (KV freed, recomputed later)", w, registry=r
        )
        self.oom_preemptions = Counter(
            p + "num_oom_preemptions",
            "Sequences preempted because a step ran out of device memory (also in num_preemptions)",
            w,
            registry=r,
        )
        self.restarts = Counter(p + "worker_restarts", "Worker processes restarted after dying", w, registry=r)
        self.stalls = Counter(
            p + "worker_stalls",
            "Workers killed by the watchdog for reporting no step within --worker-stall-timeout",
            w,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            p + "preprocess_seconds",
            "Time to decode, transform and tokenize one request in the preprocessing stage",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_images = Counter(
            p + "preprocess_images",
            "Images (video frames included) decoded and transformed by the preprocessing stage",
            registry=r,
        )
        self.tenant_requests = Counter(
            p + "tenant_requests",
            "RPCs of the service by tenant and gRPC status code",
            ["tenant", "code"],
            registry=r,
        )
        self.tenant_generation_tokens = Counter(
            p + "tenant_generation_tokens", "Tokens generated for each tenant's requests", ["tenant"], registry=r
        )
        self._tenants: set[str] = set()
        self.video_decode_seconds = Histogram(
            p + "video_decode_seconds",
            "Time to decode one video's sampled frames and transform them, in the preprocessing stage",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.video_frames_sampled = Counter(
            p + "video_frames_sampled", "Video frames sampled for the model (each becomes an image)", registry=r
        )
        self.video_frames_decoded = Counter(
            p + "video_frames_decoded",
            "Video frames decoded to reach the sampled ones (keyframe seeking skips the others)",
            registry=r,
        )
        self.worker_image_decodes = Counter(
            p + "worker_image_decodes",
            "Images decoded inside a worker process (always 0: preprocessing decodes)",
            w,
            registry=r,
        )
        self.vision_tiles = Counter(p + "vision_tiles", "336-px crops run through the vision tower", w, registry=r)
        self.encoder_cache_hits = Counter(
            p + "encoder_cache_hits",
            "Images whose embedding came from the encoder cache (vision tower skipped)",
            w,
            registry=r,
        )
        self.encoder_cache_misses = Counter(
            p + "encoder_cache_misses", "Images the vision tower had to encode", w, registry=r
        )

        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and code",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC handling time on the server",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.info = Info(p + "build", "Model, version, devices and KV-cache geometry", registry=r)
        # Families labelled by worker only: their series are created at zero when the worker is first ready.
        self._per_worker = (
            self.ttft,
            self.itl,
            self.e2e,
            self.queue,
            self.prefill,
            self.decode,
            self.vision,
            self.prompt_tokens_hist,
            self.image_tokens_hist,
            self.generation_tokens_hist,
            self.step_tokens,
            self.step_seconds,
            self.forward_seconds,
            self.prompt_tokens,
            self.cached_tokens,
            self.image_tokens,
            self.generation_tokens,
            self.preemptions,
            self.oom_preemptions,
            self.restarts,
            self.stalls,
            self.worker_image_decodes,
            self.vision_tiles,
            self.encoder_cache_hits,
            self.encoder_cache_misses,
        )
        # Per worker, the last cumulative counts its engine reported (a restarted process starts at 0).
        self._seen: dict[str, dict[str, int]] = {}

    def attach(self, router: Any, state: Any, pool: Any, store: Any) -> None:
        """Gauges read at scrape time from the objects that own the numbers."""
        self.workers_alive.set_function(lambda: sum(w.alive for w in router.workers))
        self.frontend_waiting.set_function(lambda: state.queued.count)
        self.uploads.set_function(lambda: state.uploads.count)
        self.preprocess_pending.set_function(lambda: pool.pending)
        self.pixel_memory.set_function(lambda: store.used_bytes)

    def preprocessed(self, seconds: float, images: int) -> None:
        if seconds > 0:
            self.preprocess_seconds.observe(seconds)
        self.preprocess_images.inc(images)

    def _tenant_label(self, tenant: str) -> str:
        # Tenants come from the token file or client certificates: bounded in practice, and hard-capped here.
        if tenant in self._tenants or len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return "other"

    def tenant_request(self, tenant: str, code: str) -> None:
        self.tenant_requests.labels(self._tenant_label(tenant), code).inc()

    def tenant_tokens(self, tenant: str, tokens: int) -> None:
        self.tenant_generation_tokens.labels(self._tenant_label(tenant)).inc(tokens)

    def video_decoded(self, seconds: float, sampled: int, decoded: int) -> None:
        self.video_decode_seconds.observe(seconds)
        self.video_frames_sampled.inc(sampled)
        self.video_frames_decoded.inc(decoded)

    def _advance(self, name: str, counter: Counter, key: str, value: int) -> None:
        """Add a worker's cumulative count's growth since its last report to `counter`."""
        seen = self._seen.setdefault(name, {})
        if value > seen.get(key, 0):
            counter.labels(name).inc(value - seen.get(key, 0))
        seen[key] = value

    def request_finished(
        self,
        worker: str,
        reason: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        image_tokens: int,
        generation_tokens: int,
        queue_seconds: float | None,
        ttft_seconds: float | None,
        total_seconds: float,
    ) -> None:
        self.finished.labels(worker, reason).inc()
        self.prompt_tokens.labels(worker).inc(prompt_tokens)
        self.cached_tokens.labels(worker).inc(cached_tokens)
        self.image_tokens.labels(worker).inc(image_tokens)
        self.prompt_tokens_hist.labels(worker).observe(prompt_tokens)
        self.image_tokens_hist.labels(worker).observe(image_tokens)
        self.generation_tokens_hist.labels(worker).observe(generation_tokens)
        self.e2e.labels(worker).observe(total_seconds)
        if queue_seconds is not None:
            self.queue.labels(worker).observe(queue_seconds)
        if ttft_seconds is not None:
            if queue_seconds is not None:
                self.prefill.labels(worker).observe(max(0.0, ttft_seconds - queue_seconds))
            self.decode.labels(worker).observe(max(0.0, total_seconds - ttft_seconds))

    # RouterObserver
    def worker_ready(self, worker: WorkerHandle, msg: WorkerReady) -> None:
        # A labelled series only appears when first used, and rate()/increase() see nothing of the step that
        # creates it: a worker's first restart would read as increase() == 0 and never alert. Export every
        # per-worker counter and histogram at 0 from the start (a no-op after a restart).
        for family in self._per_worker:
            family.labels(worker.name)
        # What the warm-up did is not service: counting starts from the ready worker's numbers.
        cache = msg.stats.encoder_cache
        self._seen[worker.name] = {
            "preemptions": msg.stats.num_preemptions,
            "oom_preemptions": msg.stats.num_oom_preemptions,
            "hits": cache.hits if cache else 0,
            "misses": cache.misses if cache else 0,
        }
        self.kv_total.labels(worker.name).set(msg.stats.kv_blocks_total)
        self._worker_stats(worker.name, msg.stats)

    def worker_step(self, worker: WorkerHandle, report: StepReport) -> None:
        name = worker.name
        self._worker_stats(name, report.stats)
        self._advance(name, self.worker_image_decodes, "decodes", report.image_decodes)
        step = report.timings
        if step is not None:
            self.step_seconds.labels(name).observe(report.seconds)
            if step.num_tokens:
                self.step_tokens.labels(name).observe(step.num_tokens)
                self.forward_seconds.labels(name).observe(step.forward_seconds + step.sample_seconds)
            if step.num_tiles:
                self.vision_tiles.labels(name).inc(step.num_tiles)
            if step.num_images_encoded:
                per_image = step.vision_seconds / step.num_images_encoded
                for _ in range(step.num_images_encoded):
                    self.vision.labels(name).observe(per_image)

    def worker_stalled(self, worker: WorkerHandle) -> None:
        self.stalls.labels(worker.name).inc()

    def worker_died(self, worker: WorkerHandle) -> None:
        self.restarts.labels(worker.name).inc()
        self._seen[worker.name] = {}  # the new process counts from zero
        self.running.labels(worker.name).set(0)
        self.waiting.labels(worker.name).set(0)

    def _worker_stats(self, name: str, stats: EngineStats) -> None:
        self._advance(name, self.preemptions, "preemptions", stats.num_preemptions)
        self._advance(name, self.oom_preemptions, "oom_preemptions", stats.num_oom_preemptions)
        cache = stats.encoder_cache
        if cache is not None:
            self._advance(name, self.encoder_cache_hits, "hits", cache.hits)
            self._advance(name, self.encoder_cache_misses, "misses", cache.misses)
            self.encoder_cache_rows.labels(name).set(cache.used_rows)
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_free.labels(name).set(stats.kv_blocks_free)
        self.kv_cached.labels(name).set(stats.num_cached_blocks)
        total = stats.kv_blocks_total
        self.kv_usage.labels(name).set(1.0 - stats.kv_blocks_free / total if total else 0.0)
