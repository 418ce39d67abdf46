"""``trio-wsgate serve --workers N``: one gateway from N processes on one port.

A node is one trio process on one core. With ``--workers N`` the command becomes a
*supervisor* that starts N node processes (*workers*) which all listen on the same
port with ``SO_REUSEPORT`` (:mod:`trio_wsgate.listeners`): the kernel spreads new
connections across them. The workers act as one gateway exactly as N nodes sharing a
Redis do (docs/operations.md, "Several nodes"): a client that reconnects to another
worker resumes its session there, topics, presence and kicks are shared. So they need
a Redis:

* ``--redis URL`` (or ``WSGATE_REDIS``): the one given, shared with other machines too;
* else a **private Redis**: the supervisor starts ``redis-server`` on a Unix socket in
  a directory only this user can read, with no TCP port and nothing written to disk.
  It lives and dies with the supervisor: a restart of the whole machine's gateway
  starts with no sessions and no history. Decided over an in-process broker between
  the workers: it is the engine many nodes already use, so the workers add no code
  path of their own to the delivery guarantees, and a Unix socket is its fastest
  link.

The supervisor also serves the machine's admin port: ``/healthz``, ``/readyz`` (200
while every worker is ready, 200 ``degraded`` while some are, 503 while none is or
while draining), ``/metrics`` (every worker's series in one scrape, each with a
``worker`` label, and ``wsgate_workers``/``wsgate_workers_ready``), and ``/api/*``
(``/api/stats`` from every worker; the rest answered by one ready worker, in turn,
since they act on the whole gateway). Each worker serves its own admin endpoints on a
Unix socket beside the private Redis, for the supervisor only.

SIGTERM or SIGINT drains every worker (each closes its connections with 1001 and parks
their sessions in Redis, as a node does), then stops; a second signal kills them. A
worker that ends on its own is started again, after a backoff (1 s, doubling, at most
30 s; back to 1 s after a minute of running).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .admin import BODY_MARGIN, JSON, TEXT, Answer, HttpApp, probe
from .config import Config
from .listeners import bind_tcp

__all__ = ["WORKER_ENV", "MachineAdmin", "Supervisor", "http_request", "merge_metrics"]

logger = logging.getLogger("trio_wsgate.workers")

#: The environment variable that tells a worker its index (its log lines show it).
WORKER_ENV = "WSGATE_WORKER_INDEX"
#: Most bytes the supervisor reads of one answer of a worker's (``/metrics`` included).
_MAX_ANSWER = 16 << 20
#: Seconds a worker has to answer the supervisor, and to be ready at start.
_ASK_TIMEOUT = 5.0
_START_TIMEOUT = 60.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    # Linux's PR_SET_PDEATHSIG: SIGTERM when the thread that started the child ends, so
    # that no worker or private Redis outlives the supervisor, even one killed with
    # SIGKILL (a worker drains on it). Children are started from _Spawner's thread,
    # which lives as long as the supervisor's process.
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != _SUPERVISOR:  # it died between the fork and the prctl
        os.kill(os.getpid(), signal.SIGKILL)


_SUPERVISOR = os.getpid()  # a child's parent, which it checks after asking to die with it

try:
    _libc: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:  # pragma: no cover
    _libc = None


class Child:
    """A child process the supervisor started (a worker, or the private Redis)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has ended and been waited for."""
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait until it ends (on Linux, without a thread: its pidfd)."""
        if self.popen.returncode is None:
            if hasattr(os, "pidfd_open"):
                fd = os.pidfd_open(self.pid)
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    os.close(fd)
            else:  # pragma: no cover - not Linux
                await trio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True)
        return self.popen.wait()

    def send_signal(self, signum: int) -> None:
        """Signal it, unless it has ended."""
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return once it has ended."""
        with trio.CancelScope(shield=True):
            self.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait()
            if self.returncode is None:
                self.send_signal(signal.SIGKILL)
                await self.wait()


class _Spawner:
    """Starts the children from one thread of its own, which lives as long as the
    process: PR_SET_PDEATHSIG follows the thread that forked, and trio's threads
    come and go."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[list[str], dict[str, Any], concurrent.futures.Future[Child]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            command, options, future = self._requests.get()
            try:
                future.set_result(Child(subprocess.Popen(command, **options)))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    async def spawn(self, command: list[str], **options: Any) -> Child:
        """Start ``command`` (``subprocess.Popen`` options), in a session of its own:
        a terminal's Ctrl-C, sent to the whole foreground group, reaches the
        supervisor only, which then stops its children in order."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="wsgate-spawner", daemon=True)
            self._thread.start()
        options = {"stdin": subprocess.DEVNULL, "start_new_session": True, **options}
        if _libc is not None and hasattr(_libc, "prctl"):
            options["preexec_fn"] = _die_with_parent
        future: concurrent.futures.Future[Child] = concurrent.futures.Future()
        self._requests.put((command, options, future))
        return await trio.to_thread.run_sync(future.result)


_spawner = _Spawner()


class WorkerFailed(Exception):
    """A worker could not start: the supervisor stops."""


class WorkerUnreachable(Exception):
    """A worker did not answer its admin socket."""


async def http_request(
    path: str,
    target: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    timeout: float = _ASK_TIMEOUT,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One HTTP/1.1 request over the Unix socket at ``path`` (h11): status, headers, body.

    Raises:
        WorkerUnreachable: no answer within ``timeout``, a broken one, or over 16 MiB.
    """
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=method,
        target=target,
        headers=[
            (b"host", b"worker"),
            (b"connection", b"close"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    )
    status, answer_headers, chunks, size = 0, [], [], 0
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(
                    connection.send(request)
                    + connection.send(h11.Data(data=body))
                    + connection.send(h11.EndOfMessage())
                )
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status, answer_headers = event.status_code, list(event.headers)
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > _MAX_ANSWER:
                            raise WorkerUnreachable(f"{target}: answer over {_MAX_ANSWER} bytes")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
    except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as exc:
        raise WorkerUnreachable(f"{target}: {exc!r}") from exc
    return status, answer_headers, b"".join(chunks)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_metrics(expositions: Sequence[tuple[str, str]], extra: Sequence[Metric] = ()) -> bytes:
    """One exposition of several: each ``(worker, text)``'s samples get the label
    ``worker``; families of one name become one family. ``extra`` is added as is."""
    merged: dict[str, Metric] = {}
    for worker, text in expositions:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = {**sample.labels, "worker": worker}
                into.samples.append(type(sample)(sample.name, labels, *sample[2:]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), *extra]))
    exposition: bytes = generate_latest(registry)
    return exposition


@dataclass
class Worker:
    """One worker process, and what the supervisor knows of it."""

    index: int
    admin_socket: str
    process: Child | None = None
    #: Starts so far (1 after the first).
    starts: int = 0
    ready: bool = False
    exits: list[int] = field(default_factory=list)


class PrivateRedis:
    """A redis-server for this machine's workers only: a Unix socket in a private
    directory, no TCP port, nothing on disk. Started again if it dies."""

    def __init__(self, directory: str, binary: str) -> None:
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}"
        self._directory = directory
        self._binary = binary

    def command(self) -> list[str]:
        return [
            self._binary,
            "--port",
            "0",
            "--unixsocket",
            self.socket,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._directory,
            "--loglevel",
            "warning",
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            # Its start-up banner goes nowhere; it says what fails on stderr.
            child = await _spawner.spawn(self.command(), stdout=subprocess.DEVNULL)
            try:
                await self._wait_answering(child)
                if not started:
                    started = True
                    task_status.started()
                await child.wait()
            finally:
                await child.stop(5.0)
            logger.error(
                "the private redis-server exited (%s): starting it again; the workers' "
                "sessions and history are gone",
                child.returncode,
            )
            await trio.sleep(1.0)

    async def _wait_answering(self, child: Child) -> None:
        with trio.fail_after(_START_TIMEOUT):
            while child.popen.poll() is None:
                with contextlib.suppress(OSError):
                    stream = await trio.open_unix_socket(self.socket)
                    async with stream:
                        await stream.send_all(b"PING\r\n")
                        if (await stream.receive_some(16)).startswith(b"+PONG"):
                            return
                await trio.sleep(0.02)
        raise WorkerFailed(f"the private redis-server ended at start ({child.returncode})")


class Supervisor:
    """Run ``workers`` node processes on one port (see the module's docstring).

    Args:
        argv: the ``serve`` command line the workers get (``--workers`` and the port,
            admin and Redis settings are put after it, and win).
        config: the settings that ``argv`` gives (the port, the admin port, Redis).
        workers: how many.
        redis_server: the ``redis-server`` binary for a private Redis (found on the
            PATH if None); used only when ``config`` names no Redis.
    """

    def __init__(
        self,
        argv: Sequence[str],
        config: Config,
        workers: int,
        *,
        redis_server: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("--workers must be at least 1")
        self.config = config
        self.argv = list(argv)
        self.workers: list[Worker] = []
        self.count = workers
        self.draining = False
        self.forced = False
        #: ``(host, port)`` the workers listen on, and of the machine's admin port.
        self.listen_addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []
        self.redis_url = config.redis_url
        self._redis_server = redis_server
        if config.redis_url is None and redis_server is None:
            self._redis_server = shutil.which("redis-server")
            if self._redis_server is None:
                raise ValueError(
                    f"--workers {workers} needs a Redis for the workers to share: give "
                    "--redis URL, or install redis-server (apt-get install redis-server) "
                    "for a private one"
                )
        self._next = 0  # the worker that answers the next /api request
        self._stopped = trio.Event()
        self._all_ended = trio.Event()  # set once every worker has ended in a drain
        self._tasks: trio.Nursery  # the supervisor's own nursery, once it runs
        #: The supervisor's own internal errors (its admin port's).
        self.internal_errors = _Count()

    def serve(self) -> int:
        """Run in a trio run of its own until drained; the process's exit code."""
        config = self.config

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                for host, port in self.listen_addresses:
                    logger.info(
                        "listening on ws://%s:%d%s (%d workers on one port)",
                        host,
                        port,
                        config.path,
                        self.count,
                    )
                for host, port in self.admin_addresses:
                    logger.info("admin on http://%s:%d (the whole machine)", host, port)
                if config.redis_url is None:
                    logger.info("the workers share a private redis-server (a Unix socket)")

        failed = False
        try:
            trio.run(main)
        except* WorkerFailed as group:  # trio's nurseries wrap what their tasks raise
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            logger.error("trio-wsgate: %s", first)
            failed = True
        except* trio.TooSlowError:
            logger.error("trio-wsgate: the workers were not ready within %.0f s", _START_TIMEOUT)
            failed = True
        return 1 if failed or self.forced else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, serve until drained by a signal (or cancelled)."""
        config = self.config
        with tempfile.TemporaryDirectory(prefix="wsgate-") as directory:
            os.chmod(directory, 0o700)
            env = dict(os.environ)
            if config.secret is None:
                # Resume tokens must verify on every worker: one key for all of them.
                env["WSGATE_SECRET"] = secrets.token_urlsafe(32)
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                # Before anything starts: a signal during start-up drains what has
                # started, rather than killing this process and leaving its children.
                await nursery.start(self._watch_signals)
                if config.redis_url is None:
                    assert self._redis_server is not None
                    redis = PrivateRedis(directory, self._redis_server)
                    await nursery.start(redis.run)
                    self.redis_url = env["WSGATE_REDIS"] = redis.url
                # Bound, never listening: it holds the port (0 picks one) for the
                # workers, also while one of them starts again.
                if config.port:
                    # Another process holding the port with SO_REUSEPORT too (another
                    # machine's gateway, started twice) would share its connections.
                    try:
                        for sock in await bind_tcp(config.port, config.host, reuse_port=False):
                            sock.close()
                    except OSError as exc:
                        raise WorkerFailed(f"port {config.port} is in use: {exc}") from exc
                holders = await bind_tcp(config.port, config.host, reuse_port=True)
                try:
                    port = holders[0].getsockname()[1]
                    self.listen_addresses = [
                        (str(sock.getsockname()[0]), int(sock.getsockname()[1])) for sock in holders
                    ]
                    for index in range(self.count):
                        worker = Worker(index, os.path.join(directory, f"admin-{index}.sock"))
                        self.workers.append(worker)
                        command = self._command(worker, port)
                        nursery.start_soon(self._keep_running, worker, command, env)
                    await self._wait_ready()
                    if config.admin_port is not None and not self.draining:
                        await nursery.start(self._serve_admin)
                    task_status.started()
                    await self._stopped.wait()
                    nursery.cancel_scope.cancel()
                finally:
                    for sock in holders:
                        sock.close()

    def _command(self, worker: Worker, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trio_wsgate",
            *self.argv,
            "--workers",
            "1",
            "--port",
            str(port),
            "--reuse-port",
            "--admin-socket",
            worker.admin_socket,
        ]

    async def _keep_running(self, worker: Worker, command: list[str], env: dict[str, str]) -> None:
        delay = 1.0
        env = {**env, WORKER_ENV: str(worker.index)}
        while not self.draining:
            started = trio.current_time()
            worker.starts += 1
            worker.ready = False
            worker.process = child = await _spawner.spawn(command, env=env)
            try:
                if self.draining:  # decided while it was being started: drain it too
                    child.send_signal(signal.SIGTERM)
                elif worker.starts > 1:  # a start again: ready once it answers
                    self._tasks.start_soon(self._mark_ready, worker, child)
                returncode = await child.wait()
            finally:  # cancelled: the supervisor stops (its workers are drained by then)
                await child.stop(self.config.drain_timeout + 2 * self.config.close_timeout + 5)
            worker.exits.append(returncode)
            worker.ready = False
            if self.draining:
                break
            if trio.current_time() - started > 60:
                delay = 1.0
            logger.error(
                "worker %d exited with %s: starting it again in %.0f s",
                worker.index,
                returncode,
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)
        if not any(_running(other) for other in self.workers):
            self._all_ended.set()

    async def _mark_ready(self, worker: Worker, child: Child) -> None:
        """A worker started again is ready (for /api) once it says so."""
        with trio.move_on_after(_START_TIMEOUT):
            while child.returncode is None and worker.process is child:
                if await self._is_ready(worker):
                    worker.ready = True
                    return
                await trio.sleep(0.1)

    async def _wait_ready(self) -> None:
        """Until every worker answers ``/readyz`` with 200 (at most a minute)."""
        with trio.fail_after(_START_TIMEOUT):
            while not all(worker.ready for worker in self.workers) and not self.draining:
                for worker in self.workers:
                    if worker.exits:  # it ended before it was ever ready
                        raise WorkerFailed(
                            f"worker {worker.index} exited with {worker.exits[0]} at start "
                            "(its log is above)"
                        )
                    if not worker.ready:
                        worker.ready = await self._is_ready(worker)
                await trio.sleep(0.05)

    async def _is_ready(self, worker: Worker) -> bool:
        try:
            status, _, _ = await http_request(worker.admin_socket, "/readyz", timeout=1.0)
        except WorkerUnreachable:
            return False
        return status == 200

    # -- drain ------------------------------------------------------------------------

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        asked = False  # (not draining: two signals at once both came before the drain)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()  # listening: what starts next is covered
            async for signum in signals:
                if not (asked or self.draining):
                    asked = True
                    logger.info("%s: draining %d workers", signal.Signals(signum).name, self.count)
                    trio.lowlevel.spawn_system_task(self.drain)
                else:
                    logger.warning(
                        "%s again: stopping the workers now", signal.Signals(signum).name
                    )
                    self.forced = True
                    self._signal_workers(signal.SIGKILL)

    async def drain(self) -> None:
        """Drain every worker (SIGTERM), wait for them to end, then stop."""
        self.draining = True
        self._signal_workers(signal.SIGTERM)
        config = self.config
        # A worker drains within drain_timeout, then its close_timeout, then its
        # disconnect hooks: past that and a margin, it is killed.
        bound = config.drain_timeout + 2 * config.close_timeout + 5.0
        with trio.move_on_after(bound):
            while any(_running(worker) for worker in self.workers):
                await self._all_ended.wait()
                self._all_ended = trio.Event()
        if any(_running(worker) for worker in self.workers):
            logger.error("workers still running %.0f s after SIGTERM: killing them", bound)
            self.forced = True
            self._signal_workers(signal.SIGKILL)
        self._stopped.set()

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None:
                worker.process.send_signal(signum)

    # -- the machine's admin port -----------------------------------------------------

    async def _serve_admin(self, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        assert config.admin_port is not None
        listeners = await trio.open_tcp_listeners(config.admin_port, host=config.admin_host)
        self.admin_addresses = [
            (str(name[0]), int(name[1]))
            for name in (listener.socket.getsockname() for listener in listeners)
        ]
        task_status.started()
        await MachineAdmin(self).serve(listeners)

    def next_worker(self) -> Worker | None:
        """The next worker to send an API request to: ready ones, in turn."""
        for _ in range(len(self.workers)):
            worker = self.workers[self._next % len(self.workers)]
            self._next += 1
            if worker.ready and _running(worker):
                return worker
        return None


def _running(worker: Worker) -> bool:
    return worker.process is not None and worker.process.returncode is None


class _Count:
    """The supervisor's count of its own internal errors."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


# Request headers an API request carries on to the worker that answers it.
_FORWARDED = (b"authorization", b"content-type")


class MachineAdmin(HttpApp):
    """The machine's admin port, answered from every worker's admin socket."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(supervisor.internal_errors)
        self._supervisor = supervisor

    async def handle(self, scope: Any, receive: Any) -> Answer:
        method, path = scope["method"], scope["path"]
        if path.startswith("/api/"):
            return await self._api(scope, receive)
        if method not in ("GET", "HEAD"):
            return 405, b"Method Not Allowed\n", TEXT, [(b"allow", b"GET, HEAD")]
        if path == "/readyz":
            return await self._readyz()
        probed = probe(path, True)
        if probed is not None:
            return probed[0], probed[1].encode(), TEXT, []
        if path == "/metrics":
            return 200, await self._metrics(), CONTENT_TYPE_LATEST, []
        return 404, b"Not Found\n", TEXT, []

    async def _ask_all(
        self,
        target: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        timeout: float = _ASK_TIMEOUT,
    ) -> list[Any]:
        """Every running worker's answer to ``GET target`` (None where it gave none)."""
        workers = [w for w in self._supervisor.workers if _running(w)]
        answers: list[Any] = [None] * len(workers)

        async def ask(slot: int, worker: Worker) -> None:
            with contextlib.suppress(WorkerUnreachable):
                answers[slot] = (
                    worker,
                    *await http_request(
                        worker.admin_socket, target, headers=headers, timeout=timeout
                    ),
                )

        async with trio.open_nursery() as nursery:
            for slot, worker in enumerate(workers):
                nursery.start_soon(ask, slot, worker)
        return answers

    async def _readyz(self) -> Answer:
        supervisor = self._supervisor
        if supervisor.draining:
            return 503, b"draining\n", TEXT, []
        answers = await self._ask_all("/readyz", timeout=1.0)  # a probe waits little
        ready = [a for a in answers if a is not None and a[1] == 200]
        for worker in supervisor.workers:
            worker.ready = any(a[0] is worker for a in ready)
        total = supervisor.count
        if not ready:
            return 503, f"no worker ready (0 of {total})\n".encode(), TEXT, []
        degraded = [a for a in ready if b"degraded" in a[3]]
        if len(ready) < total or degraded:
            text = f"ready (degraded: {len(ready)} of {total} workers ready"
            text += f", {len(degraded)} without the broker)\n" if degraded else ")\n"
            return 200, text.encode(), TEXT, []
        return 200, f"ready ({total} workers)\n".encode(), TEXT, []

    async def _metrics(self) -> bytes:
        supervisor = self._supervisor
        answers = await self._ask_all("/metrics")
        expositions = [
            (str(a[0].index), a[3].decode()) for a in answers if a is not None and a[1] == 200
        ]
        workers = GaugeMetricFamily("wsgate_workers", "Worker processes this machine runs.")
        workers.add_metric([], supervisor.count)
        ready = GaugeMetricFamily(
            "wsgate_workers_ready", "Worker processes whose metrics this scrape has."
        )
        ready.add_metric([], len(expositions))
        restarts = GaugeMetricFamily(
            "wsgate_worker_starts", "Times each worker process was started.", labels=["worker"]
        )
        for worker in supervisor.workers:
            restarts.add_metric([str(worker.index)], worker.starts)
        return merge_metrics(expositions, [workers, ready, restarts])

    async def _api(self, scope: Any, receive: Any) -> Answer:
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() in _FORWARDED]
        if scope["path"] == "/api/stats" and scope["method"] == "GET":
            return await self._stats(headers)
        # No more than a worker takes (its admin port answers 413 past it).
        limit = self._supervisor.config.max_message_size + BODY_MARGIN
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # as a node answers it (docs/protocol.md §10)
                reason = f"the body is larger than {limit} bytes"
                body = json.dumps({"error": "too_large", "reason": reason}).encode() + b"\n"
                return 413, body, JSON, []
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        worker = self._supervisor.next_worker()
        if worker is None:
            return _unavailable("no worker is ready")
        # As it came (raw_path): decoded, "%3F" would start a query and "%C3%A9" would
        # not make a request target at all.
        raw = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        target = (raw + (b"?" + query if query else b"")).decode("latin-1")
        try:
            status, answer_headers, answer = await http_request(
                worker.admin_socket, target, method=scope["method"], headers=headers, body=body
            )
        except WorkerUnreachable:
            return _unavailable(f"worker {worker.index} did not answer")
        content_type = JSON
        extra = []
        for name, value in answer_headers:
            if name == b"content-type":
                content_type = value.decode()
            elif name in (b"allow", b"retry-after", b"www-authenticate"):
                extra.append((name, value))
        return status, answer, content_type, extra

    async def _stats(self, headers: list[tuple[bytes, bytes]]) -> Answer:
        answers = [a for a in await self._ask_all("/api/stats", headers) if a is not None]
        if not answers:
            # No worker to check the key with: nothing is answered (a 200 of zeros
            # would pass for the machine's state, to anyone, key or not).
            return _unavailable("no worker answered")
        for _, status, answer_headers, body in answers:
            if status != 200:  # the key is wrong, or the API is off: as the worker says
                extra = [(n, v) for n, v in answer_headers if n == b"www-authenticate"]
                return status, body, JSON, extra
        stats = [json.loads(body) for _, _, _, body in answers]
        total = {
            key: sum(s[key] for s in stats)
            for key in ("connections", "sessions", "sessions_detached")
            if all(isinstance(s.get(key), int) for s in stats)
        }
        value = {
            "workers": self._supervisor.count,
            "draining": self._supervisor.draining,
            **total,
            "nodes": stats,
        }
        return 200, json.dumps(value, separators=(",", ":")).encode() + b"\n", JSON, []


def _unavailable(reason: str) -> Answer:
    body = json.dumps({"error": "unavailable", "reason": reason}).encode() + b"\n"
    return 503, body, JSON, [(b"retry-after", b"1")]
