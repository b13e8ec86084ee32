"""Regenerate ``bench/RESULTS.md``: every scenario, against the gateway and the bare server.

Starts ``bench/bare_server.py`` and, when the ``anima-gateway`` console script exists, the
gateway (``anima-gateway run`` with a temporary state directory) as subprocesses. With two
or more usable CPUs the servers are pinned to one core and the load generator to another.
It makes R rounds of every scenario, gateway and bare back to back, and the report gives
the median with the min-max spread, the gateway/bare ratio, and the product goals marked
met or not met. The idle-memory scenario starts a fresh server for every run, which also
yields the resident memory at start.

Then, for the record of the speed work, it measures the gateway of each commit that changed
speed (checked out in a temporary git worktree, one run each) and profiles the gateway
before and after that work under the 16x8 load with cProfile.

Every subprocess is stopped in ``finally``; every loop is bounded in count and every
subprocess wait in time; all traffic goes to 127.0.0.1.

Usage: ``python bench/run_all.py [--quick] [--runs R] [--idle-connections K] ...``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiling import (
    BEFORE_SPEED_WORK,
    SPEED_COMMITS,
    ProfileRow,
    Revision,
    checkout,
    describe,
    runner_command,
    top_functions,
)
from wsclient import CLIENT_KINDS

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LOADGEN = BENCH_DIR / "loadgen.py"
BARE_SERVER = BENCH_DIR / "bare_server.py"
HOST = "127.0.0.1"
GATEWAY = "gateway"
BARE = "bare"
BARE_WSPROTO = "bare-wsproto"
BARE_STACKS = {BARE: "trio-websocket", BARE_WSPROTO: "wsproto"}
TARGETS = (GATEWAY, BARE, BARE_WSPROTO)
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 5.0
LOADGEN_SLACK_S = 60.0
MAX_STARTS_PER_TARGET = 3
QUIET_SAMPLE_S = 0.25
QUIET_CPU_SHARE = 0.05
QUIET_MACHINE_SHARE = 0.25
QUIET_MACHINE_PCT = 10.0
SHARED_MACHINE_PCT = 50.0
QUIET_WAIT_LIMIT_S = 5.0
HISTORY_SCENARIOS = ("idle", "rpc-1x1", "rpc-16x8", "rpc-64x8", "handshakes-device")
PROFILE_SCENARIO = "rpc-16x8"
PROFILE_TOP = 15
PACKAGES = ("trio", "trio-websocket", "wsproto", "msgspec", "cryptography")


class ServerUnavailable(Exception):
    """A server could not be started; the message says why, for the report."""


@dataclass(frozen=True)
class Scenario:
    """One load-generator invocation, run R times against each target."""

    key: str
    title: str
    mode: str
    args: tuple[str, ...]
    fresh_server: bool = False


@dataclass
class Settings:
    """What this invocation of run_all measures, and how long."""

    runs: int
    duration: float
    warmup: float
    settle: float
    idle_connections: int
    fanout_subscribers: int
    handshake_clients: int
    client: str
    quick: bool
    output: Path
    skip_gateway: bool
    history: tuple[str, ...]
    profile_before: str | None
    profile: bool


@dataclass
class RunOutcome:
    """One loadgen run: its JSON result, or why there is none."""

    result: dict[str, Any] | None
    failure: str | None = None


@dataclass
class RevisionRun:
    """One commit's gateway, measured once per history scenario."""

    revision: Revision
    outcomes: dict[str, RunOutcome]
    start_rss_kib: int | None = None
    failure: str | None = None


@dataclass
class ProfileRun:
    """The gateway of one tree under cProfile while the 16x8 load ran."""

    label: str
    outcome: RunOutcome | None = None
    total_s: float = 0.0
    rows: list[ProfileRow] | None = None
    failure: str | None = None


@dataclass
class ServerProcess:
    """A running server subprocess and where its log goes."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The server's process id (the console script execs Python in place)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        """Last lines of the server's log, to say why it failed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate, then kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_TIMEOUT_S)


def scenarios(settings: Settings) -> list[Scenario]:
    """The fixed scenario list, sized by ``settings``."""
    handshake_clients = str(settings.handshake_clients)
    return [
        Scenario(
            "idle",
            f"idle memory, {settings.idle_connections} connections",
            "idle",
            ("--connections", str(settings.idle_connections)),
            fresh_server=True,
        ),
        Scenario(
            "rpc-1x1",
            "rpc 1 connection x 1 in flight",
            "rpc",
            ("--connections", "1", "--inflight", "1"),
        ),
        Scenario("rpc-16x8", "rpc 16 x 8", "rpc", ("--connections", "16", "--inflight", "8")),
        Scenario("rpc-64x8", "rpc 64 x 8", "rpc", ("--connections", "64", "--inflight", "8")),
        Scenario(
            "handshakes",
            f"handshakes, token only, {handshake_clients} clients",
            "handshakes",
            ("--connections", handshake_clients),
        ),
        Scenario(
            "handshakes-device",
            f"handshakes, Ed25519 device, {handshake_clients} clients",
            "handshakes",
            ("--connections", handshake_clients, "--device"),
        ),
        Scenario(
            "fanout",
            f"fanout, {settings.fanout_subscribers} subscribers",
            "fanout",
            ("--connections", str(settings.fanout_subscribers), "--inflight", "4"),
        ),
    ]


def _pinning_preexec(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_for_listener(server: ServerProcess, timeout: float) -> None:
    """Poll until the server accepts TCP connections or exits; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerUnavailable(
                f"{server.name} exited with code {server.process.returncode} during start-up"
                + _indented_log(server)
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, server.port), 0.5):
            return
        time.sleep(0.1)
    raise ServerUnavailable(
        f"{server.name} did not listen on {HOST}:{server.port} within {timeout:.0f} s"
        + _indented_log(server)
    )


def _indented_log(server: ServerProcess) -> str:
    tail = server.log_tail()
    return ("; log tail:\n" + tail) if tail else " (empty log)"


def _read_port_line(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Read the first stdout line (the port) without blocking past ``timeout``."""
    import selectors

    assert process.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise ServerUnavailable("bare server did not print its port in time")
            chunk = os.read(process.stdout.fileno(), 64)
            if not chunk:
                raise ServerUnavailable(f"bare server exited with code {process.wait()}")
            line += chunk
    return int(line)


def start_bare(name: str, cpu: int | None, token: str, log_dir: Path) -> ServerProcess:
    """Start the bare server ``name`` (its stack) on a free port; wait until it listens."""
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    command = [sys.executable, str(BARE_SERVER), "--host", HOST, "--port", "0"]
    # "--token=" keeps a token that starts with "-" from being read as an option.
    command += ["--stack", BARE_STACKS[name], f"--token={token}"]
    command += ["--cpu", str(cpu)] if cpu is not None else []
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
    server = ServerProcess(name, process, 0, log_path)
    try:
        server.port = _read_port_line(process, SERVER_START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def gateway_script() -> Path | None:
    """The ``anima-gateway`` console script next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "anima-gateway"
    if beside.exists():
        return beside
    found = shutil.which("anima-gateway")
    return Path(found) if found else None


def start_gateway(
    cpu: int | None,
    token: str,
    state_root: Path,
    log_dir: Path,
    *,
    tree: Path | None = None,
    profile_to: Path | None = None,
) -> ServerProcess:
    """Start the gateway with a fresh state directory and wait until it listens.

    By default this is the installed ``anima-gateway run``; with ``tree`` (a checkout of
    another commit) or ``profile_to`` (a cProfile dump written at exit) it is that tree's
    gateway, started through ``gateway_runner.py``.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=state_root))
    port = _free_port()
    env = {**os.environ, "ANIMA_STATE_DIR": str(state_dir), "ANIMA_GATEWAY_TOKEN": token}
    log_path = log_dir / f"gateway-{time.monotonic_ns()}.log"
    gateway_args = ["run", "--host", HOST, "--port", str(port)]
    if tree is None and profile_to is None:
        script = gateway_script()
        if script is None:
            raise ServerUnavailable("the `anima-gateway` console script is not installed")
        command = [str(script), *gateway_args]
    else:
        command = [sys.executable, *runner_command(tree or REPO_DIR, profile_to, gateway_args)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # preexec_fn is unsafe only with threads, and run_all starts none.
            preexec_fn=_pinning_preexec(cpu),
        )
    server = ServerProcess(GATEWAY, process, port, log_path)
    try:
        _wait_for_listener(server, SERVER_START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def run_loadgen(
    scenario: Scenario,
    server: ServerProcess,
    settings: Settings,
    token: str,
    generator_cpu: int | None,
) -> RunOutcome:
    """Run one loadgen process with ``--json`` and parse its single JSON line."""
    command = [
        sys.executable,
        str(LOADGEN),
        scenario.mode,
        "--url",
        f"ws://{HOST}:{server.port}",
        f"--token={token}",
        "--duration",
        str(settings.duration),
        "--warmup",
        str(settings.settle if scenario.mode == "idle" else settings.warmup),
        "--server-pid",
        str(server.pid),
        "--client",
        settings.client,
        "--json",
        *scenario.args,
    ]
    if generator_cpu is not None:
        command += ["--cpu", str(generator_cpu)]
    timeout = settings.warmup + settings.duration + LOADGEN_SLACK_S
    try:
        completed = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return RunOutcome(None, f"loadgen did not finish within {timeout:.0f} s")
    stderr_tail = completed.stderr.decode(errors="replace").strip()[-600:]
    lines = completed.stdout.decode(errors="replace").strip().splitlines()
    if completed.returncode not in (0, 1) or not lines:
        return RunOutcome(None, f"loadgen exited {completed.returncode}: {stderr_tail}")
    try:
        return RunOutcome(json.loads(lines[-1]))
    except json.JSONDecodeError as exc:
        return RunOutcome(None, f"loadgen printed no JSON ({exc}): {stderr_tail}")


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(servers: list[ServerProcess]) -> str | None:
    """Wait (bounded) until neither our servers nor other processes keep the CPUs busy.

    Leftover work (closing the previous run's sockets, timers) or someone else's job would
    otherwise share the cores with the next run. Returns what was still busy when the wait
    gave up, or None once the machine was quiet.
    """
    deadline = time.monotonic() + QUIET_WAIT_LIMIT_S
    while True:
        servers_before = {server.pid: _cpu_seconds(server.pid) for server in servers}
        machine_before = _machine_busy_seconds()
        time.sleep(QUIET_SAMPLE_S)
        busy = []
        for server in servers:
            start, end = servers_before[server.pid], _cpu_seconds(server.pid)
            if start is not None and end is not None:
                share = (end - start) / QUIET_SAMPLE_S
                if share > QUIET_CPU_SHARE:
                    busy.append(f"{server.name} at {share:.0%} of a core")
        machine_after = _machine_busy_seconds()
        if machine_before is not None and machine_after is not None:
            share = (machine_after - machine_before) / QUIET_SAMPLE_S
            if share > QUIET_MACHINE_SHARE:
                busy.append(f"the machine at {share:.0%} of a core")
        if not busy:
            return None
        if time.monotonic() >= deadline:
            return ", ".join(busy)


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Bench:
    """Owns the server processes and collects every run's outcome."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.token = secrets.token_urlsafe(24)
        self.log_dir = workdir / "logs"
        self.state_root = workdir / "state"
        self.log_dir.mkdir()
        self.state_root.mkdir()
        self.server_cpu, self.generator_cpu = choose_cpus()
        self.targets = list(BARE_STACKS) if settings.skip_gateway else list(TARGETS)
        self.unavailable: dict[str, str] = {}
        if settings.skip_gateway:
            self.unavailable[GATEWAY] = "skipped with --skip-gateway"
        elif gateway_script() is None:
            self.unavailable[GATEWAY] = (
                f"the `anima-gateway` console script was not found next to {sys.executable}"
                " or on PATH"
            )
        self.outcomes: dict[tuple[str, str], list[RunOutcome]] = {}
        self.start_rss_kib: dict[str, list[int]] = {target: [] for target in TARGETS}
        self.notes: list[str] = []
        self.busy_waits: list[str] = []
        self._servers: dict[str, ServerProcess] = {}
        self._long_lived_starts: dict[str, int] = dict.fromkeys(TARGETS, 0)
        self._all_started: list[ServerProcess] = []
        self.history: list[RevisionRun] = []
        self.profiles: list[ProfileRun] = []
        self._workdir = workdir

    def _start(self, target: str) -> ServerProcess:
        if target in BARE_STACKS:
            server = start_bare(target, self.server_cpu, self.token, self.log_dir)
        else:
            server = start_gateway(self.server_cpu, self.token, self.state_root, self.log_dir)
        self._all_started.append(server)
        return server

    def _long_lived(self, target: str) -> ServerProcess:
        """The shared server for ``target``, restarted (a bounded number of times) if dead."""
        server = self._servers.get(target)
        if server is not None and server.alive():
            return server
        if server is not None:
            self.notes.append(
                f"{target} exited with code {server.process.returncode} between runs and was"
                f" restarted; log tail:\n\n```\n{server.log_tail()}\n```"
            )
        if self._long_lived_starts[target] >= MAX_STARTS_PER_TARGET:
            raise ServerUnavailable(
                f"{target} died after each of {MAX_STARTS_PER_TARGET} starts; giving up"
            )
        self._long_lived_starts[target] += 1
        server = self._start(target)
        self._servers[target] = server
        return server

    def _record(self, scenario: Scenario, target: str, outcome: RunOutcome) -> None:
        self.outcomes.setdefault((scenario.key, target), []).append(outcome)
        result = outcome.result
        if result is None:
            summary = f"FAILED: {outcome.failure}"
        else:
            summary = f"errors={result['errors']} " + headline(scenario.mode, result)
        print(f"  {scenario.key:<18} {target:<8} {summary}", flush=True)

    def run_scenario(self, scenario: Scenario) -> None:
        """One run of ``scenario``, the targets back to back."""
        print(f"{scenario.title}", flush=True)
        for target in self.targets:
            if target in self.unavailable:
                continue
            if scenario.fresh_server:
                self._fresh_run(scenario, target)
                continue
            try:
                server = self._long_lived(target)
            except ServerUnavailable as exc:
                self._note_unavailable(target, str(exc))
                continue
            self._settle_servers(scenario)
            outcome = run_loadgen(scenario, server, self.settings, self.token, self.generator_cpu)
            self._record(scenario, target, outcome)

    def _fresh_run(self, scenario: Scenario, target: str) -> None:
        try:
            server = self._start(target)
        except ServerUnavailable as exc:
            self._note_unavailable(target, str(exc))
            return
        try:
            time.sleep(self.settings.settle)
            self._settle_servers(scenario)
            rss = read_rss_kib(server.pid)
            if rss is not None:
                self.start_rss_kib[target].append(rss)
            outcome = run_loadgen(scenario, server, self.settings, self.token, self.generator_cpu)
            self._record(scenario, target, outcome)
        finally:
            server.stop()

    def measure_history(self) -> None:
        """Each commit of ``settings.history`` once per history scenario, then this tree."""
        chosen = [s for s in scenarios(self.settings) if s.key in HISTORY_SCENARIOS]
        print("what each change gave", flush=True)
        # The main runs are over: their servers would only sit beside the ones measured now.
        for server in self._servers.values():
            server.stop()
        for rev in self.settings.history:
            try:
                revision = describe(rev)
            except ValueError as exc:
                self.notes.append(f"history: {exc}; left out")
                continue
            with checkout(rev) as tree:
                self.history.append(self._measure_tree(revision, tree, chosen))
        current = Revision("HEAD", _git_revision(), "this tree, as measured above")
        self.history.append(self._measure_tree(current, REPO_DIR, chosen))

    def _measure_tree(self, revision: Revision, tree: Path, chosen: list[Scenario]) -> RevisionRun:
        run = RevisionRun(revision, {})
        server = None
        try:
            for scenario in chosen:
                fresh = scenario.fresh_server or server is None
                if fresh:
                    server = self._start_from(tree)
                self._settle_servers(scenario)
                if scenario.fresh_server:
                    time.sleep(self.settings.settle)
                    run.start_rss_kib = read_rss_kib(server.pid)
                outcome = run_loadgen(
                    scenario, server, self.settings, self.token, self.generator_cpu
                )
                run.outcomes[scenario.key] = outcome
                self._record(scenario, f"{GATEWAY}@{revision.short}", outcome)
                if scenario.fresh_server:
                    server.stop()
                    server = None
        except ServerUnavailable as exc:
            run.failure = str(exc)
            print(f"  {revision.short} unavailable: {exc}", flush=True)
        finally:
            if server is not None:
                server.stop()
        return run

    def _start_from(self, tree: Path, profile_to: Path | None = None) -> ServerProcess:
        server = start_gateway(
            self.server_cpu,
            self.token,
            self.state_root,
            self.log_dir,
            tree=tree,
            profile_to=profile_to,
        )
        self._all_started.append(server)
        return server

    def profile_before_and_after(self) -> None:
        """cProfile of the gateway under the 16x8 load: before the speed work and now."""
        print("profiles", flush=True)
        before = self.settings.profile_before
        if before is not None:
            try:
                revision = describe(before)
            except ValueError as exc:
                self.notes.append(f"profile: {exc}; no before profile")
            else:
                label = f"Before: `{revision.short}` {revision.subject}"
                with checkout(before) as tree:
                    self.profiles.append(self._profile(label, tree))
        label = f"After: this tree (`{_git_revision()}`)"
        self.profiles.append(self._profile(label, REPO_DIR))

    def _profile(self, label: str, tree: Path) -> ProfileRun:
        run = ProfileRun(label)
        scenario = next(s for s in scenarios(self.settings) if s.key == PROFILE_SCENARIO)
        dump = self._workdir / f"profile-{time.monotonic_ns()}.prof"
        try:
            server = self._start_from(tree, profile_to=dump)
        except ServerUnavailable as exc:
            run.failure = str(exc)
            return run
        try:
            self._settle_servers(scenario)
            # The runner profiles only between these signals: the load, not start or stop.
            os.kill(server.pid, signal.SIGUSR1)
            run.outcome = run_loadgen(
                scenario, server, self.settings, self.token, self.generator_cpu
            )
            os.kill(server.pid, signal.SIGUSR2)
        finally:
            # SIGTERM: the gateway shuts down and the runner writes the profile on its way out.
            server.stop()
        if not dump.exists():
            run.failure = f"no profile written (exit code {server.process.returncode})"
            return run
        run.total_s, run.rows = top_functions(dump, PROFILE_TOP, tree)
        if run.outcome.result is not None:
            print(f"  {label}: {headline('rpc', run.outcome.result)}", flush=True)
        return run

    def _settle_servers(self, scenario: Scenario) -> None:
        running = [server for server in self._all_started if server.alive()]
        still_busy = wait_until_quiet(running)
        if still_busy:
            self.busy_waits.append(f"{scenario.key}: {still_busy}")

    def _note_unavailable(self, target: str, reason: str) -> None:
        print(f"  {target} unavailable: {reason}", flush=True)
        if not any(self.outcomes.get((key, target)) for key, _ in self.outcomes):
            self.unavailable.setdefault(target, reason)
        else:
            self.notes.append(f"{target} became unavailable: {reason}")

    def close(self) -> None:
        """Stop every server this run started."""
        for server in self._all_started:
            with contextlib.suppress(Exception):
                server.stop()


def choose_cpus() -> tuple[int | None, int | None]:
    """Servers on the first usable CPU, the generator on the second (if there is one)."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) >= 2:
        return usable[0], usable[1]
    return None, None


def headline(mode: str, result: dict[str, Any]) -> str:
    """The main figure of a run, for the progress lines."""
    if mode == "rpc":
        return f"{result['rps']:,.0f} rps p99 {result['latency_ms']['p99']} ms"
    if mode == "handshakes":
        return f"{result['handshakes_per_s']:,.0f} handshakes/s"
    if mode == "idle":
        return f"{result['kib_per_connection']} KiB/connection"
    return f"{result['events_per_s']:,.0f} events/s, {result['seq_gaps']} seq gaps"


def raise_open_file_limit() -> None:
    """Lift the soft descriptor limit; children (servers, generator) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class Metric:
    """One figure of the report, read from every run of one scenario."""

    scenario: str
    label: str
    extract: Callable[[dict[str, Any]], float | None]
    style: str


def _key(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def extract(result: dict[str, Any]) -> float | None:
        value: Any = result
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else None

    return extract


START_RSS = "start-rss"
SECTIONS: list[tuple[str, list[Metric]]] = [
    (
        "Requests (rpc, `last-heartbeat`)",
        [
            metric
            for shape in ("1x1", "16x8", "64x8")
            for metric in (
                Metric(f"rpc-{shape}", f"{shape} requests/s", _key("rps"), "count"),
                Metric(f"rpc-{shape}", f"{shape} p50 ms", _key("latency_ms", "p50"), "ms"),
                Metric(f"rpc-{shape}", f"{shape} p99 ms", _key("latency_ms", "p99"), "ms"),
            )
        ],
    ),
    (
        "Handshakes (open, challenge, connect, hello-ok, close)",
        [
            Metric("handshakes", "token only, handshakes/s", _key("handshakes_per_s"), "count"),
            Metric("handshakes", "token only, p99 ms", _key("latency_ms", "p99"), "ms"),
            Metric(
                "handshakes-device",
                "Ed25519 device, handshakes/s",
                _key("handshakes_per_s"),
                "count",
            ),
            Metric("handshakes-device", "Ed25519 device, p99 ms", _key("latency_ms", "p99"), "ms"),
        ],
    ),
    (
        "Memory",
        [
            Metric(START_RSS, "resident at start, MiB", _key("mib"), "size"),
            Metric("idle", "KiB per idle connection", _key("kib_per_connection"), "size"),
            Metric("idle", "events sent to the idle connections", _key("events_seen"), "count"),
        ],
    ),
    (
        "Fan-out (`system-event` -> `presence.changed`)",
        [
            Metric("fanout", "events delivered/s", _key("events_per_s"), "count"),
            Metric("fanout", "emitter calls/s", _key("emits_per_s"), "count"),
            Metric("fanout", "delivery ratio", _key("delivery_ratio"), "ratio"),
            Metric("fanout", "seq gaps", _key("seq_gaps"), "count"),
        ],
    ),
]


def _format(value: float | None, style: str) -> str:
    if value is None:
        return "n/a"
    if style == "count":
        return f"{value:,.0f}"
    if style == "ms":
        return f"{value:.3f}"
    if style == "ratio":
        return f"{value:.3f}"
    return f"{value:,.1f}"


class Report:
    """Turns a finished ``Bench`` into RESULTS.md."""

    def __init__(self, bench: Bench, command: list[str], started: datetime.datetime) -> None:
        self.bench = bench
        self.settings = bench.settings
        self.command = command
        self.started = started

    def values(self, metric: Metric, target: str) -> list[float]:
        """The metric over every successful run of ``target``."""
        if metric.scenario == START_RSS:
            return [kib / 1024 for kib in self.bench.start_rss_kib[target]]
        found = []
        for outcome in self.bench.outcomes.get((metric.scenario, target), []):
            if outcome.result is not None:
                value = metric.extract(outcome.result)
                if value is not None:
                    found.append(value)
        return found

    def median(self, metric: Metric, target: str) -> float | None:
        """Median of the metric over the runs of ``target``, None without data."""
        found = self.values(metric, target)
        return statistics.median(found) if found else None

    def cell(self, metric: Metric, target: str) -> str:
        """``median (min-max)`` for the runs of ``target``, or why there is nothing."""
        if target in self.bench.unavailable:
            return "not measured"
        found = self.values(metric, target)
        if not found:
            return "no data"
        text = _format(statistics.median(found), metric.style)
        if len(found) > 1:
            low, high = _format(min(found), metric.style), _format(max(found), metric.style)
            text += f" ({low}-{high})"
        return text

    def ratio(self, metric: Metric, bare_target: str) -> str:
        """gateway median / bare median, formatted for the table."""
        gateway, bare = self.median(metric, GATEWAY), self.median(metric, bare_target)
        if gateway is None or bare is None or bare == 0:
            return "n/a"
        return f"{gateway / bare:.2f}"

    def render(self) -> str:
        """The whole Markdown document."""
        parts = [
            self._header(),
            self._goals(),
            *self._sections(),
            self._history(),
            self._profiles(),
            self._busy(),
            self._errors(),
            self._notes(),
        ]
        return "\n\n".join(part for part in parts if part) + "\n"

    def _header(self) -> str:
        settings = self.settings
        mode = "**quick smoke run** (numbers are indicative only)" if settings.quick else "full run"
        usable = len(os.sched_getaffinity(0))
        if self.bench.server_cpu is None:
            pinning = "not pinned (fewer than two usable CPUs)"
        else:
            pinning = (
                f"servers on CPU {self.bench.server_cpu}, load generator on CPU"
                f" {self.bench.generator_cpu}"
            )
        versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
        lines = [
            "# Benchmark results",
            "",
            "Generated by `bench/run_all.py`; do not edit by hand, rerun it.",
            "",
            f"- Date: {self.started:%Y-%m-%d %H:%M} UTC",
            f"- Command: `{shlex.join(self.command)}`",
            f"- Run: {mode}; {settings.runs} run(s) per scenario and target, each measuring"
            f" {settings.duration:g} s after {settings.warmup:g} s warm-up; values are the"
            " median with the (min-max) spread",
            f"- Machine: {_cpu_model()}, {os.cpu_count()} logical CPUs ({usable} usable),"
            f" {_memory_gib():.1f} GiB RAM, Linux {platform.release()}",
            f"- Pinning: {pinning}",
            f"- Software: Python {platform.python_version()}, {versions}",
            f"- Load generator client: `{settings.client}` (see bench/README.md)",
            f"- Gateway: {self._gateway_line()}",
            f"- Other load: {self._other_load_line()}",
        ]
        return "\n".join(lines)

    def _other_load_line(self) -> str:
        shares = [
            outcome.result["other_cpu_pct"]
            for outcomes in self.bench.outcomes.values()
            for outcome in outcomes
            if outcome.result is not None and outcome.result.get("other_cpu_pct") is not None
        ]
        if not shares:
            return "unknown"
        worst, typical = max(shares), statistics.median(shares)
        text = (
            f"other processes used {typical:.0f}% of a core in the median window and"
            f" {worst:.0f}% at most"
        )
        if typical > QUIET_MACHINE_PCT or worst > SHARED_MACHINE_PCT:
            text += " — **the machine was shared; treat spreads as noise, not signal**"
        elif worst > QUIET_MACHINE_PCT:
            text += "; a few windows were shared briefly (see who was busy)"
        return text

    def _gateway_line(self) -> str:
        reason = self.bench.unavailable.get(GATEWAY)
        if reason is not None:
            return (
                "**NOT MEASURED** — "
                + reason.replace("\n", " ")[:600]
                + ". Only the bare-server half below has numbers."
            )
        return (
            f"`anima-gateway run --host {HOST} --port <free port>` with a fresh temporary"
            f" `ANIMA_STATE_DIR`, at `{_git_revision()}`"
        )

    def _goals(self) -> str:
        rows = ["## Product goals", ""]
        rows += ["| goal | gateway | status | bare | bare-wsproto |", "|---|---|---|---|---|"]
        for title, evaluate in GOALS:
            gateway_text, met = evaluate(self, GATEWAY)
            bares = [evaluate(self, target) for target in BARE_STACKS]
            if GATEWAY in self.bench.unavailable:
                gateway_text, status = "n/a", "not measured"
            elif met is None:
                status = "no data"
            elif met:
                status = "met"
            elif all(bare_met is False for _, bare_met in bares):
                status = "**not met**, nor by either bare server on this machine"
            else:
                status = "**not met**"
            bare_cells = " | ".join(text for text, _ in bares)
            rows.append(f"| {title} | {gateway_text} | {status} | {bare_cells} |")
        return "\n".join(rows)

    def _sections(self) -> list[str]:
        rendered = []
        for title, metrics in SECTIONS:
            rows = [
                f"## {title}",
                "",
                "| metric | gateway | bare | bare-wsproto | gateway/bare | gateway/bare-wsproto |",
                "|---|---|---|---|---|---|",
            ]
            for metric in metrics:
                cells = [self.cell(metric, target) for target in TARGETS]
                cells += [self.ratio(metric, target) for target in BARE_STACKS]
                rows.append(f"| {metric.label} | " + " | ".join(cells) + " |")
            rendered.append("\n".join(rows))
        return rendered

    def _history(self) -> str:
        if not self.bench.history:
            return ""
        rows = [
            "## What each change gave",
            "",
            "The gateway of each commit that changed speed or memory, oldest first, checked out"
            " in a git worktree and measured once per scenario right after the runs above,"
            " with the same settings; the last row is this tree again, measured the same way."
            " One run each, so read a difference smaller than the spreads above as noise.",
            "",
            "| commit | change | 1x1 rps | 1x1 p99 ms | 16x8 rps | 64x8 rps"
            " | Ed25519 handshakes/s | KiB per idle connection | resident at start, MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        figures = [
            ("rpc-1x1", ("rps",), "count"),
            ("rpc-1x1", ("latency_ms", "p99"), "ms"),
            ("rpc-16x8", ("rps",), "count"),
            ("rpc-64x8", ("rps",), "count"),
            ("handshakes-device", ("handshakes_per_s",), "count"),
            ("idle", ("kib_per_connection",), "size"),
        ]
        for run in self.bench.history:
            cells = []
            for scenario_key, path, style in figures:
                outcome = run.outcomes.get(scenario_key)
                result = outcome.result if outcome is not None else None
                cells.append(_format(_key(*path)(result) if result else None, style))
            rss = run.start_rss_kib
            cells.append(_format(rss / 1024 if rss is not None else None, "size"))
            subject = run.failure or run.revision.subject
            subject = subject if len(subject) <= 90 else subject[:87] + "..."
            rows.append(
                f"| `{run.revision.short}` | {subject.replace('|', '/')} | "
                + " | ".join(cells)
                + " |"
            )
        return "\n".join(rows)

    def _profiles(self) -> str:
        if not self.bench.profiles:
            return ""
        rows = [
            "## Profile at 16x8, before and after the speed work",
            "",
            "cProfile of the gateway process while the generator ran rpc 16x8 for"
            f" {self.settings.duration:g} s (after {self.settings.warmup:g} s warm-up), recorded"
            f" from the generator's start to its end; the {PROFILE_TOP} functions with the most"
            " own time, and their share of the profiled time. The profiler slows every Python"
            " call, so compare where the time goes, not the request rates.",
        ]
        for run in self.bench.profiles:
            rows += ["", f"### {run.label}", ""]
            if run.failure is not None or run.rows is None:
                rows.append(f"No profile: {run.failure}")
                continue
            result = run.outcome.result if run.outcome is not None else None
            rate = _format(result["rps"], "count") if result else "n/a"
            rows += [
                f"{rate} requests/s under the profiler; {run.total_s:.2f} s of profiled time.",
                "",
                "| own s | share | calls | cumulative s | function |",
                "|---|---|---|---|---|",
            ]
            for row in run.rows:
                share = row.own_s / run.total_s if run.total_s else 0.0
                rows.append(
                    f"| {row.own_s:.3f} | {share:.1%} | {row.calls:,} | {row.cumulative_s:.3f}"
                    f" | `{row.function}` |"
                )
        return "\n".join(rows)

    def _busy(self) -> str:
        rows = [
            "## Who was busy (median CPU during the measured window, % of one core)",
            "",
            "A load generator near 100% would mean the run measured the client; CPU used by"
            " other processes during the window means the machine was shared and the numbers"
            " are noisier.",
            "",
            "| scenario | target | generator CPU | server CPU | other processes |",
            "|---|---|---|---|---|",
        ]
        for scenario in scenarios(self.settings):
            for target in self.bench.targets:
                if (scenario.key, target) not in self.bench.outcomes:
                    continue
                cells = [
                    self.cell(Metric(scenario.key, "", _key(name), "count"), target)
                    for name in ("client_cpu_pct", "server_cpu_pct", "other_cpu_pct")
                ]
                rows.append(f"| {scenario.key} | {target} | " + " | ".join(cells) + " |")
        if self.bench.busy_waits:
            rows += [
                "",
                f"Before {len(self.bench.busy_waits)} run(s) the machine did not go quiet"
                f" within {QUIET_WAIT_LIMIT_S:g} s, so those runs shared it with other work:",
                "",
            ]
            rows += [f"- {entry}" for entry in self.bench.busy_waits]
        return "\n".join(rows)

    def _errors(self) -> str:
        rows = ["## Errors", ""]
        found = False
        for (scenario_key, target), outcomes in self.bench.outcomes.items():
            for number, outcome in enumerate(outcomes, start=1):
                where = f"{scenario_key}, {target}, run {number}"
                if outcome.result is None:
                    found = True
                    rows.append(f"- {where}: **run failed**: {outcome.failure}")
                elif outcome.result["errors"]:
                    found = True
                    rows.append(f"- {where}: {outcome.result['errors']} error(s)")
                    rows += [f"  - `{sample}`" for sample in outcome.result["error_samples"]]
        if not found:
            rows.append("No errors in any run.")
        return "\n".join(rows)

    def _notes(self) -> str:
        rows = [
            "## Notes",
            "",
            "- `bare` and `bare-wsproto` are `bench/bare_server.py` answering the same frames"
            " with the least work (both still verify Ed25519 signatures). `bare` uses"
            " trio-websocket's public API: a reader task, a one-slot queue and one write per"
            " message. `bare-wsproto` drives wsproto directly and writes all replies produced"
            " by one read at once; it is the ceiling for a server that, like the gateway,"
            " drives wsproto itself. gateway/bare-wsproto is the share of that ceiling the"
            " gateway reaches; for latencies a ratio above 1 means slower.",
            "- Idle memory and resident-at-start come from a fresh server per run: RSS read"
            f" {self.settings.settle:g} s after it listens, then the idle connections are"
            " opened and RSS is read again after they settle.",
        ]
        rows += [f"- {note}" for note in self.bench.notes]
        return "\n".join(rows)


GoalCheck = Callable[[Report, str], tuple[str, bool | None]]


def _rps(scenario: str) -> Metric:
    return Metric(scenario, "", _key("rps"), "count")


def _goal_rps_16x8(report: Report, target: str) -> tuple[str, bool | None]:
    rps = report.median(_rps("rpc-16x8"), target)
    return (_format(rps, "count") + " rps", None if rps is None else rps >= 9500)


def _goal_1x1(report: Report, target: str) -> tuple[str, bool | None]:
    rps = report.median(_rps("rpc-1x1"), target)
    p99 = report.median(Metric("rpc-1x1", "", _key("latency_ms", "p99"), "ms"), target)
    text = f"{_format(rps, 'count')} rps, p99 {_format(p99, 'ms')} ms"
    if rps is None or p99 is None:
        return text, None
    return text, rps >= 3000 and p99 < 1.0


def _goal_no_collapse(report: Report, target: str) -> tuple[str, bool | None]:
    wide, base = report.median(_rps("rpc-64x8"), target), report.median(_rps("rpc-16x8"), target)
    if wide is None or not base:
        return "n/a", None
    share = wide / base
    return f"64x8 = {share:.0%} of 16x8", share >= 0.9


def _goal_handshakes(report: Report, target: str) -> tuple[str, bool | None]:
    rate = report.median(Metric("handshakes-device", "", _key("handshakes_per_s"), ""), target)
    return (_format(rate, "count") + " /s", None if rate is None else rate >= 600)


def _goal_idle(report: Report, target: str) -> tuple[str, bool | None]:
    kib = report.median(Metric("idle", "", _key("kib_per_connection"), ""), target)
    return (_format(kib, "size") + " KiB", None if kib is None else kib <= 24)


def _goal_start_rss(report: Report, target: str) -> tuple[str, bool | None]:
    mib = report.median(Metric(START_RSS, "", _key("mib"), ""), target)
    return (_format(mib, "size") + " MiB", None if mib is None else mib <= 60)


GOALS: list[tuple[str, GoalCheck]] = [
    ("≥ 9,500 requests/s at 16x8", _goal_rps_16x8),
    ("≥ 3,000 requests/s at 1x1 with p99 < 1 ms", _goal_1x1),
    ("no collapse at 64x8 (≥ 90% of 16x8)", _goal_no_collapse),
    ("≥ 600 handshakes/s with Ed25519 verification", _goal_handshakes),
    ("≤ 24 KiB per idle connection", _goal_idle),
    ("≤ 60 MiB resident at start", _goal_start_rss),
]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return 0.0


def _git_revision() -> str:
    """Commit of the working tree (read-only git), flagged when it has local changes."""
    try:
        revision = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        # The report being rewritten is no change to what is measured.
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", ".", ":!bench/RESULTS.md"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"{revision} + uncommitted changes" if dirty else revision


def parse_args(argv: list[str] | None = None) -> Settings:
    """Parse the command line; ``--quick`` changes the defaults, explicit flags win."""
    parser = argparse.ArgumentParser(description="Regenerate bench/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="short smoke run, ~1 s/scenario")
    parser.add_argument("--runs", type=int, help="runs per scenario and target (default 3)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (default 1)")
    parser.add_argument("--settle", type=float, help="seconds before RSS readings (default 1)")
    parser.add_argument("--idle-connections", type=int, help="idle scenario size (default 500)")
    parser.add_argument(
        "--fanout-subscribers", type=int, default=100, help="fanout scenario size (default 100)"
    )
    parser.add_argument(
        "--handshake-clients", type=int, default=8, help="parallel handshake clients (default 8)"
    )
    parser.add_argument(
        "--client", choices=CLIENT_KINDS, default="raw", help="loadgen --client (default raw)"
    )
    parser.add_argument("--skip-gateway", action="store_true", help="measure the bare server only")
    parser.add_argument(
        "--history",
        nargs="*",
        default=list(SPEED_COMMITS),
        metavar="REV",
        help="commits to measure once each for 'what each change gave' (none: skip)",
    )
    parser.add_argument(
        "--profile-before",
        default=BEFORE_SPEED_WORK,
        metavar="REV",
        help=f"commit profiled as 'before' (default {BEFORE_SPEED_WORK})",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip both profiles")
    parser.add_argument(
        "--output", type=Path, default=BENCH_DIR / "RESULTS.md", help="default bench/RESULTS.md"
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    settings = Settings(
        runs=pick(args.runs, 3, 1),
        duration=pick(args.duration, 5.0, 1.0),
        warmup=pick(args.warmup, 1.0, 0.2),
        settle=pick(args.settle, 1.0, 0.3),
        idle_connections=pick(args.idle_connections, 500, 100),
        fanout_subscribers=args.fanout_subscribers,
        handshake_clients=args.handshake_clients,
        client=args.client,
        quick=quick,
        output=args.output,
        skip_gateway=args.skip_gateway,
        history=() if args.skip_gateway else tuple(args.history),
        profile_before=args.profile_before,
        profile=not (args.no_profile or args.skip_gateway),
    )
    if settings.runs < 1 or settings.runs > 50:
        parser.error("--runs must be between 1 and 50")
    if settings.duration <= 0 or settings.duration > 600:
        parser.error("--duration must be in (0, 600] seconds")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Run everything, write the report, and stop every process started."""
    settings = parse_args(argv)
    raise_open_file_limit()
    started = datetime.datetime.now(datetime.UTC)
    command = [Path(sys.executable).name, *sys.argv] if argv is None else ["run_all.py", *argv]
    with tempfile.TemporaryDirectory(prefix="anima-bench-") as workdir:
        bench = Bench(settings, Path(workdir))
        if GATEWAY in bench.unavailable:
            print(f"gateway not measured: {bench.unavailable[GATEWAY]}", flush=True)
        try:
            # Runs outermost: each round takes every scenario once, so a machine whose speed
            # drifts (a shared VM) moves all scenarios alike, and ratios between them hold.
            for round_number in range(1, settings.runs + 1):
                print(f"round {round_number} of {settings.runs}", flush=True)
                for scenario in scenarios(settings):
                    bench.run_scenario(scenario)
            if settings.history:
                bench.measure_history()
            if settings.profile:
                bench.profile_before_and_after()
        finally:
            bench.close()
        report = Report(bench, command, started).render()
    settings.output.write_text(report, encoding="utf-8")
    troubled = sum(
        1
        for outcomes in bench.outcomes.values()
        for outcome in outcomes
        if outcome.result is None or outcome.result["errors"]
    )
    print(f"wrote {settings.output}; {troubled} run(s) failed or reported errors", flush=True)
    for target, reason in bench.unavailable.items():
        print(f"{target} NOT MEASURED: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
