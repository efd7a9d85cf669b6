"""Start and stop one `tritonserver` process per instance.

How the bundled server runs here (DESIGN.md, checked): the `nvidia-pytriton` wheel ships tritonserver
2.51 and a Python-backend stub per Python version. The backend directory must hold the stub next to
libtriton_python.so (pytriton copies them into a workspace; we link them into a temp dir);
LD_LIBRARY_PATH starts with this interpreter's sysconfig LIBDIR (else the stub loads the system
libpython and every model fails), then the wheel's bundled libs; the virtualenv's bin is first on PATH
(the stub runs the `python` it finds there). GPU deployments use `tritonserver` from PATH instead.

Each server runs in its own session (process group): Ctrl-C in the terminal reaches only `serve`, which
stops servers with SIGTERM (Triton then finalizes the models: rank processes, KV server, registry) and,
past the timeout, SIGKILLs the group and removes the group's Python-backend /dev/shm regions.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

# How long Triton waits, after SIGTERM, for in-flight requests and then for the model to unload, before it
# exits anyway. An idle python-backend instance takes ~2 s: the backend's stub health check sleeps 1 s, the
# model finalizes (ranks, KV server, registry) in ~0.3 s, and Triton looks once a second. Work still in
# flight at the deadline is failed by the model's finalize (`shutting_down`), which the router retries
# elsewhere: an instance stops in under 3 s.
EXIT_TIMEOUT_S = 2
SHM_PREFIX = "trtd_tb_"  # our Python-backend shm regions: /dev/shm/trtd_tb_<instance>_<random>_*
# Triton's Python backend makes an (unused, empty) /tmp/python_env_XXXXXX at start whatever TMPDIR says, and only
# its normal exit removes it: a killed server's is removed by stop() (rmdir: only while it is empty)
PYTHON_ENV_GLOB = "/tmp/python_env_*"
_CLAIMED_PYTHON_ENVS: set[str] = set()  # attributed to a server of this process already
KV_SHM_PREFIX = "trtd_kv_"  # = kv.shm.SEGMENT_PREFIX: the KV server's segments, /dev/shm/trtd_kv_<instance>_<random>_*


@dataclass(frozen=True)
class TritonBinary:
    executable: Path
    backend_dir: Path | None  # None: the server's default (/opt/tritonserver/backends)
    cache_dir: Path | None
    lib_dirs: tuple[Path, ...]
    # GPU metrics (NVML/DCGM): off for the wheel's CPU server, where asking for them only logs
    # "Failed to initialize NVML" and "DCGM unable to start" at every start.
    gpu_metrics: bool = False
    # Triton's Prometheus endpoint: off for the wheel's CPU server, whose instances report their load
    # through Redis and the router's /metrics; stopping that endpoint alone takes Triton ~0.9 s, which would
    # push an instance stop past 3 s.
    metrics_server: bool = False


def bundled_tritonserver(work_dir: Path) -> TritonBinary:
    """The pytriton wheel's server, with a backend dir that holds this interpreter's stub."""
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    backends = work_dir / "backends"
    (backends / "python").mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            _link(item, backends / "python" / item.name)
    _link(stub, backends / "python" / "triton_python_backend_stub")
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return TritonBinary(root / "bin" / "tritonserver", backends, root / "caches",
                        tuple(p for p in (libs, root / "external_libs") if p.is_dir()))


def system_tritonserver() -> TritonBinary | None:
    found = shutil.which("tritonserver")
    return None if found is None else TritonBinary(Path(found), None, None, (), gpu_metrics=True,
                                                   metrics_server=True)


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.symlink(src, dst)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (bind to 0). The server binds it a moment later; a race loses with a clear
    'port taken' failure, never a hang."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    grpc: int
    http: int
    metrics: int
    kv: int

    @classmethod
    def pick(cls, host: str = "127.0.0.1", grpc: int | None = None, exclude: set[int] | None = None) -> Ports:
        """Four distinct free ports, none in `exclude` (ports already handed to this deployment's servers:
        a probe socket closes at once, so the kernel may offer the same port again)."""
        ports: set[int] = set() if grpc is None else {grpc}
        while len(ports) < 4:
            port = free_port(host)
            if exclude is None or port not in exclude:
                ports.add(port)
        rest = sorted(ports - ({grpc} if grpc is not None else set()))
        if grpc is None:
            grpc, rest = rest[0], rest[1:]
        return cls(grpc=grpc, http=rest[0], metrics=rest[1], kv=rest[2])


def server_env(binary: TritonBinary, extra: dict[str, str], threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [libdir, *map(str, binary.lib_dirs)]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in ld if p)
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = ":".join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.update(extra)
    return env


class TritonProcess:
    """One tritonserver serving one instance's model repository."""

    def __init__(self, instance_id: str, model_name: str, repo_dir: Path, binary: TritonBinary,
                 ports: Ports, env: dict[str, str], log_path: Path, host: str = "127.0.0.1",
                 bind: str = "127.0.0.1") -> None:
        self.instance_id = instance_id
        self.model_name = model_name
        self.repo_dir = repo_dir
        self.ports = ports
        self.host = host  # advertised to clients
        self.bind = bind  # listened on: 127.0.0.1 on a single host, 0.0.0.0 for multi-host
        self.log_path = log_path
        self._binary = binary
        self._env = env
        self.proc: subprocess.Popen | None = None
        self._log_start = 0  # where this process's output begins in the (appended-to) log
        # Unique per process object: clean-up after a kill must never touch another deployment's regions.
        token = f"{instance_id.replace('-', '_')}_{secrets.token_hex(4)}_"
        self.shm_prefix = f"{SHM_PREFIX}{token}"
        self.kv_shm_prefix = f"{KV_SHM_PREFIX}{token}"  # the instance's KV segments (TRTD_KV_SHM_PREFIX)
        self._tmp_dir: Path | None = None
        self._python_envs_before: set[str] = set()
        # the Python backend's directories that appeared while it started; None until it is ready or stopped
        self._python_envs: set[str] | None = None

    @property
    def tmp_dir(self) -> Path | None:
        """The running server's TMPDIR (start()); None once stopped."""
        return self._tmp_dir

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    def command(self) -> list[str]:
        # --disable-auto-complete-config: the rendered config.pbtxt is complete, and with auto-complete on the
        # Python backend starts a whole stub process (interpreter, model.py's imports) only to ask the model
        # for a config it does not change, before the stub that serves. Measured on the tiny engines, idle:
        # an instance's restart 7-8 s -> 3-4 s, a deployment's cold start 20 s -> 12 s.
        cmd = [str(self._binary.executable), f"--model-repository={self.repo_dir}",
               f"--grpc-port={self.ports.grpc}", f"--http-port={self.ports.http}",
               f"--grpc-address={self.bind}", f"--http-address={self.bind}",
               "--exit-on-error=true", "--strict-readiness=true",
               "--disable-auto-complete-config",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--log-verbose=0",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if self._binary.metrics_server:
            cmd += [f"--metrics-port={self.ports.metrics}", f"--metrics-address={self.bind}"]
        else:
            cmd.append("--allow-metrics=false")
        if not self._binary.gpu_metrics:
            cmd.append("--allow-gpu-metrics=false")
        if self._binary.backend_dir is not None:
            cmd.append(f"--backend-directory={self._binary.backend_dir}")
        if self._binary.cache_dir is not None:
            cmd.append(f"--cache-directory={self._binary.cache_dir}")
        return cmd

    def start(self) -> None:
        # The server's temporary files (its Python backend's environment directory, the stub's and rank
        # processes' multiprocessing sockets) in a directory of this process alone: they are removed at exit
        # only when each process ends normally, and stop() ends stragglers with SIGKILL.
        self._tmp_dir = Path(tempfile.mkdtemp(prefix=f"trtd-{self.instance_id}-tmp-"))
        self._python_envs_before = python_env_dirs()
        env = {**self._env, "TRTD_KV_SHM_PREFIX": self.kv_shm_prefix, "TMPDIR": str(self._tmp_dir)}
        with open(self.log_path, "ab") as logf:
            self._log_start = logf.tell()
            self.proc = subprocess.Popen(self.command(), env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def own_failure(self) -> str | None:
        """What the instance itself logged as the reason it could not go on (its model logs "engine failed
        (...); ..." before making the server exit), from this process's part of the log; None if nothing."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        marker = "engine failed ("
        for line in reversed(text.splitlines()):
            if marker in line:
                return line[line.index(marker):].split("; ", 1)[0].strip()
        return None

    def port_conflict(self) -> bool:
        """Did the server fail because one of its ports was taken meanwhile (a race with another process)?"""
        return "already in use" in self.log_tail(60)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, num_lines: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def wait_ready(self, timeout_s: float) -> None:
        """Poll Triton's readiness API until the model is ready; raise with the log tail if it dies.

        Over gRPC: on SIGTERM Triton first waits (out of its short exit timeout) for open HTTP connections,
        and an HTTP client's connection lingers a while after close, so a stop soon after start would lose
        a second to it."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise UserError(f"instance {self.instance_id} exited during start-up "
                                    f"(exit code {self.proc.returncode if self.proc else '?'}); "
                                    f"log {self.log_path}:\n{self.log_tail()}")
                try:
                    if (client.is_server_ready(client_timeout=2.0)
                            and client.is_model_ready(self.model_name, client_timeout=2.0)):
                        self._claim_python_envs()
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.1)  # polling an external process; no event to wait on
        finally:
            client.close()
        raise UserError(f"instance {self.instance_id} not ready after {timeout_s:.0f}s; log {self.log_path}:\n"
                        f"{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (graceful: models finalize), then SIGKILL the whole group; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("instance %s did not stop in %.0fs; killing it", self.instance_id, timeout_s)
        kill_group(proc)  # stragglers of the group: stubs, rank processes
        self._remove_shm()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        # stopped before it was ready: what appeared since its start is its own
        envs = self._python_envs if self._python_envs is not None else self._claim_python_envs()
        remove_empty_dirs(envs)
        _CLAIMED_PYTHON_ENVS.difference_update(envs)
        self._python_envs = None

    def _claim_python_envs(self) -> set[str]:
        """The Python backend's directories that appeared since start() and no other server claimed: this
        server's (two servers starting together: the first to claim takes both, and removes both when stopped;
        an empty one a live server holds is unused, so removing it early costs that server nothing)."""
        envs = self._python_envs = python_env_dirs() - self._python_envs_before - _CLAIMED_PYTHON_ENVS
        _CLAIMED_PYTHON_ENVS.update(envs)
        return envs

    def _remove_shm(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for prefix in (self.shm_prefix, self.kv_shm_prefix):
                for p in shm.glob(f"{prefix}*"):
                    p.unlink(missing_ok=True)


def make_run_dir(prefix: str = "trtd-serve-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process started in its own session and everything in its group: SIGTERM, up to `timeout_s` for
    it to exit, then SIGKILL the group (what it started, e.g. rank processes, cannot outlive it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def python_env_dirs() -> set[str]:
    """The Python backend's environment directories now in /tmp (PYTHON_ENV_GLOB)."""
    return set(glob.glob(PYTHON_ENV_GLOB))


def remove_empty_dirs(paths: set[str]) -> None:
    """rmdir each: one that is gone (its server exited normally) or not empty (not ours to touch) stays as is."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def kill_group(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGKILL what is left of the process group `proc` leads and return once it is gone: the leader is
    reaped here; the others (not our children: their parent was the leader) are reaped by init, and until
    then a process killed while it unmaps its memory still runs for a moment."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout_s
    while group_members(proc.pid):
        if time.monotonic() > deadline:
            log.warning("process group %d still has processes %.0fs after SIGKILL", proc.pid, timeout_s)
            return
        time.sleep(0.01)  # processes that are not our children: no event to wait on


def group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (zombies, which only wait for their parent to reap them,
    do not: in a container whose init never reaps they would stay forever)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
