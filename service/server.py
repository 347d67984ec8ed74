"""Process wiring: model folder, preprocessing pool, workers, router, gRPC server, health, reflection,
metrics, draining."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from . import __version__
from .api.handlers import SERVICE, service_handler
from .api.reflection import enable_reflection
from .api.servicer import ServingState, VisionChatServiceServicer
from .config import ServerConfig, bare_host, host_port
from .devices import cpu_threads_per_worker, resolve_devices
from .engine import EngineConfig
from .metrics import Metrics
from .model.loader import inspect_checkpoint
from .platform import usable_cpus
from .platform.cpu import set_openmp_environment
from .preprocess.pixel_store import PixelStore
from .preprocess.pool import PreprocessPool
from .preprocess.preparer import Preparer
from .processor.prompt import PromptBuilder
from .processor.video import VideoLimits
from .router import Router
from .security.auth import Authenticator, AuthInterceptor
from .security.tls import CertificateFiles
from .security.tokens import TokenTable
from .worker.handle import WorkerHandle
from .worker.protocol import StepReport, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.server")


def resolve_model_dir(config: ServerConfig) -> Path:
    if config.model:
        return Path(config.model)
    from .default_model import ensure_default_model

    return ensure_default_model(config.model_cache_dir or None)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_receive_message_bytes),
        # Detect dead peers on long streams; allow clients' keepalive pings.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # grpcio sets SO_REUSEPORT by default: a second server on the same port would then start and
        # silently share the traffic. A taken port must be an error.
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age > 0:
        # Long-lived clients reconnect now and then, re-resolve DNS and spread over new replicas.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)),
        ]
    return options


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port (port 0 never is)."""
    if port == 0:
        return False
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        return False  # the bind itself will say what is wrong
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


def worker_settings(
    config: ServerConfig, model_dir: Path, devices: list[str], context_len: int
) -> list[WorkerSettings]:
    threads = cpu_threads_per_worker(devices, config.cpu_threads)
    engine = EngineConfig(
        max_model_len=context_len,
        kv_cache_memory_bytes=config.kv_cache_memory,
        block_size=config.block_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_vision_crops=config.max_vision_crops,
        vision_tiles_per_step=config.vision_tiles_per_step,
        max_image_embed_tokens=config.max_image_embed_tokens,
    )
    return [
        WorkerSettings(
            index=i,
            device=device,
            model_dir=str(model_dir),
            dtype=config.dtype,
            num_threads=threads[i],
            attention_backend=config.attention_backend,
            attention_workspace=config.attention_workspace,
            cpu_gemm=config.cpu_gemm,
            engine=engine,
            # Workers sharing a device split its fraction; each then sizes its pool from its own share.
            kv_cache_fraction=config.kv_cache_fraction / devices.count(device),
            log_format=config.log_format,
            log_level=config.log_level,
        )
        for i, device in enumerate(devices)
    ]


class HealthTracker:
    """Keeps grpc.health.v1 true to the workers.

    Both "" and the VisionChat service are NOT_SERVING until every worker is ready, and again once
    the server drains. In between, the service status follows the workers (NOT_SERVING while none
    is up, e.g. the only one restarting or stalled: readiness takes the pod out of rotation), while ""
    stays SERVING, because a worker restart is the server healing itself, not a reason for a liveness
    probe to kill the pod."""

    def __init__(self, health_servicer: health.aio.HealthServicer) -> None:
        self.health = health_servicer
        self.router: Router | None = None
        self.started = False  # every worker was ready once
        self.draining = False
        self._pending: set[asyncio.Task[None]] = set()

    async def set(self, serving: bool, names: tuple[str, ...] = ("", SERVICE)) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self.health.set(name, status)

    def _update(self) -> None:
        if not self.started or self.draining or self.router is None:
            return
        task = asyncio.get_running_loop().create_task(self.set(self.router.any_ready, (SERVICE,)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # RouterObserver
    def worker_ready(self, worker: WorkerHandle, msg: WorkerReady) -> None:
        self._update()

    def worker_step(self, worker: WorkerHandle, report: StepReport) -> None:
        pass

    def worker_stalled(self, worker: WorkerHandle) -> None:
        self._update()

    def worker_died(self, worker: WorkerHandle) -> None:
        self._update()


class VisionChatServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config)
        plan = inspect_checkpoint(self.model_dir)  # a broken folder fails here, before any worker starts
        self.model_config = plan.config
        self.builder = PromptBuilder(self.model_dir)
        self.context_len = min(
            config.max_context_tokens or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        devices = resolve_devices(config.devices, config.workers_per_device)
        from .platform import platform_for

        for device in devices:
            platform_for(device).resolve_dtype(config.dtype)  # an unknown --dtype fails here, not in a worker
        self.settings = worker_settings(config, self.model_dir, devices, self.context_len)
        self.metrics = Metrics()
        self.state = ServingState(config)
        self.health = health.aio.HealthServicer()
        self.health_tracker = HealthTracker(self.health)
        self.port = 0
        self.metrics_port = 0
        self.health_server: grpc.aio.Server | None = None
        # TLS and authentication files are read now: a bad one is a one-line start-up error.
        self.tls_files = (
            CertificateFiles(
                config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, config.tls_client_auth
            )
            if config.tls
            else None
        )
        self.authenticator = (
            Authenticator(
                TokenTable(config.auth_token_file) if config.auth_token_file else None,
                config.auth_client_cert_tenant,
                config.auth_open_reflection,
            )
            if config.authenticates
            else None
        )

    def _listen(self) -> grpc.aio.Server:
        """Bind the gRPC and metrics ports first: a port in use is one clear line, before anything starts."""
        config = self.config
        interceptors = [AuthInterceptor(self.authenticator)] if self.authenticator else []
        server = grpc.aio.server(options=grpc_options(config), interceptors=interceptors)
        address = host_port(config.host, config.port)
        in_use = ValueError(f"cannot listen on {address} (--host/--port): the address is in use or not available here")
        if port_taken(config.host, config.port):
            raise in_use  # found before grpc tries (and logs its own multi-line error)
        try:
            if self.tls_files is not None:
                self.port = server.add_secure_port(address, self.tls_files.credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio: "Failed to bind to address ..."
            raise in_use from exc
        if config.health_port:
            self.health_server = grpc.aio.server()  # plaintext, health only: what a kubelet probe can reach
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            where = host_port(config.host, config.health_port)
            if port_taken(config.host, config.health_port):
                raise ValueError(f"cannot listen on {where} (--health-port): the address is in use")
            self.health_server.add_insecure_port(where)
        if config.metrics_port >= 0:
            try:
                httpd, _thread = start_http_server(
                    config.metrics_port,
                    addr=bare_host(config.host),
                    registry=self.metrics.registry,
                    certfile=config.tls_cert_file if config.metrics_tls else None,
                    keyfile=config.tls_key_file if config.metrics_tls else None,
                )
            except OSError as exc:
                where = host_port(config.host, config.metrics_port)
                raise ValueError(f"cannot serve metrics on {where} (--metrics-port): {exc.strerror or exc}") from exc
            self.metrics_port = httpd.server_port
        return server

    async def run(self) -> int:
        config = self.config
        server = self._listen()
        # One forkserver starts every child process: it imports the preprocessing code once, and
        # children fork from it in milliseconds instead of re-importing torch and transformers.
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["service.preprocess.job"])
        store = PixelStore(config.max_pixel_memory)
        pool = PreprocessPool(
            str(self.model_dir), config.preprocess_workers or usable_cpus(), config.max_preprocess_queue
        )
        self.router = Router(
            self.settings, [self.metrics, self.health_tracker], mp.get_context("spawn"), config.worker_stall_timeout
        )
        self.health_tracker.router = self.router
        video_limits = VideoLimits(
            max_frames=config.max_video_frames,
            max_pixels=config.max_video_pixels,
            max_seconds=config.max_video_seconds,
            max_decoded_frames=config.max_video_decoded_frames,
            default_frames=config.default_video_frames,
        )
        preparer = Preparer(
            self.builder,
            pool,
            store,
            config.max_image_pixels,
            self.context_len,
            video_limits,
            self.model_config.vocab_size,
            config.allow_special_tokens_in_text,
        )
        self.metrics.attach(self.router, self.state, pool, store)
        servicer = VisionChatServiceServicer(
            config,
            self.model_config,
            preparer,
            self.router,
            self.metrics,
            self.state,
            self.context_len,
            self.builder.eos_token_ids,
            self.builder.tokenizer,
        )
        server.add_generic_rpc_handlers((service_handler(servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        await self.health_tracker.set(False)
        await server.start()
        if self.health_server is not None:
            await self.health_server.start()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        # Tests and operators read this line to find ports chosen with 0.
        metrics = host_port(config.host, self.metrics_port) if config.metrics_port >= 0 else "off"
        extra = f" health on {host_port(config.host, config.health_port)}" if config.health_port else ""
        tls = " (TLS)" if config.tls else ""
        listening = host_port(config.host, self.port)
        print(f"VisionChat {__version__} listening on {listening} metrics on {metrics}{extra}{tls}", flush=True)
        if any(s.device == "cpu" for s in self.settings):
            set_openmp_environment()  # inherited by the worker processes about to start
        self.router.start()
        ready = loop.create_task(self._become_ready(pool))
        failed = loop.create_task(self.router.startup_failed.wait())
        stopped = loop.create_task(stop.wait())
        try:
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if failed.done():
                log.error("a worker failed to start; see its log above")
                await server.stop(grace=0)
                if self.health_server is not None:
                    await self.health_server.stop(grace=0)
                await self.router.stop()
                return 1
            failed.cancel()
            await self._drain(server)
            return 0
        finally:
            pool.shutdown()
            store.close()

    async def _become_ready(self, pool: PreprocessPool) -> None:
        await asyncio.gather(self.router.wait_ready(), pool.start())
        self.metrics.info.info(
            {
                "version": __version__,
                "model": self.model_config.model_id,
                "devices": ",".join(s.device for s in self.settings),
                "kv_block_size": str(self.config.block_size),
                "kv_blocks_per_worker": ",".join(
                    str(w.state.stats.kv_blocks_total if w.state.stats else 0) for w in self.router.workers
                ),
            }
        )
        self.health_tracker.started = True
        await self.health_tracker.set(True)
        print(
            f"VisionChat ready: {len(self.router.workers)} worker(s) serving {self.model_config.model_id}", flush=True
        )

    async def _drain(self, server: grpc.aio.Server) -> None:
        """SIGTERM: NOT_SERVING at once, refuse new calls, let running streams finish, exit."""
        log.info("draining: %d call(s) in flight, up to %.0fs", self.state.in_flight, self.config.drain_seconds)
        self.state.draining = True
        self.router.draining = True
        self.health_tracker.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + self.config.drain_seconds
        while (self.state.in_flight or self.router.streams) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=0)
        await self.router.stop()
        log.info("stopped")


def main_async(config: ServerConfig) -> int:
    return asyncio.run(VisionChatServer(config).run())
