"""A fork server for tests: one process imports what every ``python -m llmexp`` imports (torch,
Lightning, transformers, Hydra: about 6 s on a 2-core machine) once, then forks a fresh child per
command. The child is a new process with its own pid, session, working directory, environment,
stdout, stderr and exit code, and runs ``llmexp.__main__`` exactly as ``python -m llmexp`` does;
only the interpreter start and the third-party imports are shared. llmexp itself is imported in
each child, so installed plugins and edited code are found as in a fresh process.

``llmexp.testing.run_cli`` uses it (``LLMEXP_TEST_FORKSERVER=0`` turns it off) unless the
environment changes a variable that libraries read at import time (PYTHONPATH, HF_HUB_*, ...):
then a fresh interpreter is the only faithful choice and run_cli starts one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

# Read when a library is imported (or by the interpreter at start): a child of the server would
# keep the server's values, so a command that changes one of these runs in a fresh interpreter.
IMPORT_TIME_PREFIXES = ("PYTHON", "HF_HUB_", "HF_DATASETS_", "HF_HOME", "TRANSFORMERS_", "TORCH", "PYTORCH_",
                        "OMP_", "MKL_", "CUDA_", "TOKENIZERS_", "LD_", "LIGHTNING_", "PL_")
# Read at run time although their prefix says otherwise (Lightning's seed_everything and Inductor's
# cache_dir() set them in the test process; a fresh interpreter sets them the same way). Lightning's
# import sets PYTORCH_NVML_BASED_CUDA_CHECK=1 and accelerate's import check may delete it again, so
# its value depends on import order; torch reads it only when it counts CUDA devices.
RUN_TIME_VARS = frozenset({"PL_GLOBAL_SEED", "PL_SEED_WORKERS", "TORCHINDUCTOR_CACHE_DIR",
                           "PYTORCH_NVML_BASED_CUDA_CHECK"})
PRELOAD = ("torch", "lightning", "lightning.pytorch", "transformers", "transformers.models.llama.modeling_llama",
           "hydra", "omegaconf", "peft", "datasets")


def import_time_changes(server_env: Mapping[str, str], env: Mapping[str, str],
                        set_by_imports: Collection[str] = (), imported: Optional[Collection[str]] = None) -> List[str]:
    """The variables a library reads at import time whose value in ``env`` differs from the server's
    (those the preloaded imports set themselves, as lightning sets PYTORCH_NVML_BASED_CUDA_CHECK, a
    fresh interpreter sets too). Given the server's ``imported`` modules, a PYTHONPATH a child can
    take as a fresh interpreter would (added_path) is no change."""
    keys = (set(server_env) | set(env)) - RUN_TIME_VARS - set(set_by_imports)
    if imported is not None and added_path(server_env, env, imported) is not None:
        keys.discard("PYTHONPATH")
    return sorted(k for k in keys if k.startswith(IMPORT_TIME_PREFIXES) and server_env.get(k) != env.get(k))


def added_path(server_env: Mapping[str, str], env: Mapping[str, str], imported: Collection[str]) -> Optional[List[str]]:
    """The directories ``env``'s PYTHONPATH puts on sys.path, where a forked child that inserts them
    after sys.path[0] imports what a fresh interpreter would: the server had no PYTHONPATH, each
    entry is an absolute path, and none holds a module the server imported (in a fresh interpreter
    it would shadow that module; in a fork the module is imported already). Else None. Plugins put
    on PYTHONPATH by tests (a module and its dist-info) pass; a directory of their own 'torch' not."""
    if server_env.get("PYTHONPATH"):
        return None
    entries = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    if not all(os.path.isabs(e) for e in entries):  # "" and relative entries mean the command's cwd
        return None
    for entry in entries:
        try:
            names = os.listdir(entry)
        except OSError:
            continue  # nothing to import from it, as in a fresh interpreter
        for name in names:
            stem = name.split(".", 1)[0]
            if stem in imported and (name.endswith((".py", ".so", ".pyc")) or "." not in name):
                return None
    return entries


_ADDED_PATH: List[str] = []  # the PYTHONPATH entries this process inserted into sys.path


def _take_python_path(env: Mapping[str, str]) -> None:
    """sys.path as a fresh interpreter with ``env`` has it: its PYTHONPATH entries after
    sys.path[0] (those of the command this process was forked from taken out first)."""
    import importlib

    for entry in _ADDED_PATH:
        if entry in sys.path:
            sys.path.remove(entry)
    _ADDED_PATH[:] = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e] if not _SERVER["env"].get(
        "PYTHONPATH") else []
    sys.path[1:1] = _ADDED_PATH
    importlib.invalidate_caches()


def _child(request: dict) -> None:
    """Become the command: fresh session, cwd, environment and standard streams, then run the
    module or script as ``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` would; never returns."""
    try:
        stdio = (os.open(os.devnull, os.O_RDONLY), os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC),
                 os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC))
    except BaseException:
        os._exit(1)
    _run_command({**request, "new_session": True}, stdio)


def _run_command(request: dict, stdio: Sequence[int]) -> None:
    """Take ``stdio`` as fds 0, 1, 2 and the request's cwd and environment, then run its module
    or script, the python commands it starts forked too (see _Zygote); never returns."""
    import runpy
    import traceback

    code = 1
    try:
        if request.get("new_session"):
            os.setsid()
        for fd, target in zip(stdio, (0, 1, 2)):
            if fd != target:
                os.dup2(fd, target)
        for fd in set(stdio) - {0, 1, 2}:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _take_python_path(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _Zygote.start()
        try:
            if "script" in request:  # python SCRIPT ARGS
                sys.argv = [request["script"], *request["args"]]
                runpy.run_path(request["script"], run_name="__main__")
            else:  # python -m MODULE ARGS (run_module puts the module's path first)
                sys.argv = [request["module"], *request["args"]]
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                sys.stderr.write(f"{e.code}\n")
                code = 1
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # a normal exit runs them (W&B, tempfile cleanups)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def python_command(args: Any, env: Mapping[str, str]) -> Optional[dict]:
    """The request that runs ``args`` (``[sys.executable, "-m", MODULE, ...]`` or
    ``[sys.executable, SCRIPT.py, ...]``) in a fork, or None where only a fresh interpreter is
    faithful: another program, interpreter options, or a variable read at import time that differs
    from the server's."""
    if isinstance(args, (str, bytes)) or not args or str(args[0]) != sys.executable or len(args) < 2:
        return None
    args = [os.fsdecode(a) for a in args]
    if import_time_changes(_SERVER["env"], env, _SERVER["set_by_imports"], _SERVER["imported"]):
        return None
    if args[1] == "-m" and len(args) > 2 and not args[2].startswith("-"):
        return {"module": args[2], "args": args[3:]}
    if args[1].endswith(".py") and os.path.isfile(args[1]):
        return {"script": args[1], "args": args[2:]}
    return None


# The fork server's environment before its imports, and what the imports set (copied into every
# command it forks, which checks its own python commands against them).
_SERVER: Dict[str, Any] = {"env": {}, "set_by_imports": [], "imported": []}


def _requests(sock: socket.socket):
    """The (request, received fds) sent on ``sock``, until its other end is closed."""
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 22, 3)
        if not message:
            return
        yield json.loads(message), fds


class _Zygote:
    """A copy of the command taken before it runs (the server's imports and nothing of the
    command's own): it forks the python commands the command starts (Lightning's extra ranks,
    ``llmexp pipeline``'s stages, a sweep's trials), which then start in milliseconds instead of
    re-importing torch, Lightning and transformers for seconds. Each runs as in _child, but in the
    command's session and process group (a timeout's killpg reaches it; start_new_session gives it
    its own), with the stdio the caller gave, and as the command's own child (the command is made a child subreaper and the
    zygote forks twice), so subprocess.Popen waits for it, polls and signals it as usual."""

    sock: Optional[socket.socket] = None
    lock = threading.Lock()

    @classmethod
    def start(cls) -> None:
        import ctypes

        if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER: Linux only
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            ours.close()
            cls._serve(theirs)
        theirs.close()
        cls.sock = ours
        subprocess.Popen = _ForkingPopen  # type: ignore[misc]  # call/run/check_output use it too

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        """Fork one command per request until the command closes its end; never returns."""
        try:
            for request, fds in _requests(sock):
                read, write = os.pipe()
                middle = os.fork()
                if middle == 0:  # its child is orphaned at once and adopted by the command
                    os.close(read)
                    pid = os.fork()
                    if pid == 0:
                        os.close(write)
                        sock.close()
                        _run_command(request, fds)
                    os.write(write, str(pid).encode())
                    os._exit(0)
                os.close(write)
                pid = int(os.read(read, 64) or b"0")
                os.close(read)
                os.waitpid(middle, 0)  # the adoption is done before the command hears the pid
                for fd in fds:
                    os.close(fd)
                sock.send(str(pid).encode())
        finally:
            os._exit(0)

    @classmethod
    def fork(cls, request: dict, stdio: Sequence[int]) -> int:
        assert cls.sock is not None
        with cls.lock:
            socket.send_fds(cls.sock, [json.dumps(request).encode()], list(stdio))
            pid = int(cls.sock.recv(64) or b"0")
        if pid <= 0:
            raise OSError("the llmexp fork server's zygote did not start the command")
        return pid


def _forked_child(popen: subprocess.Popen, fork, request: dict, cwd, env: Mapping[str, str], new_session: bool,
                  fds: Sequence[int]) -> None:
    """Start ``popen``'s process with ``fork(request, stdio)`` (which answers its pid) instead of
    executing it: the request gets the cwd, environment and session asked for, the child the
    stdio Popen prepared (``fds``: its p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)."""
    p2cread, _, _, c2pwrite, _, errwrite = fds
    request = {**request, "cwd": os.path.abspath(os.fsdecode(cwd)) if cwd is not None else os.getcwd(),
               "env": {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}, "new_session": bool(new_session)}
    stdio = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
    try:
        popen.pid = fork(request, stdio)
        popen._child_created = True  # type: ignore[attr-defined]
    finally:
        popen._close_pipe_fds(*fds)  # type: ignore[attr-defined]


class _ForkingPopen(subprocess.Popen):
    """subprocess.Popen whose python commands (python_command) are forked by the zygote; every
    other command is executed as usual."""

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,  # type: ignore[override]
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        request = None
        # rest: restore_signals, gid, gids, uid, umask, start_new_session (and process_group, 3.11+)
        plain = (not shell and executable is None and preexec_fn is None and not pass_fds
                 and list(rest[1:4]) == [None, None, None] and rest[4] == -1
                 and all(x in (None, -1) for x in rest[6:]))
        full_env = {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None else env).items()}
        if plain:
            request = python_command(args, full_env)
        if request is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, *rest)
        _forked_child(self, _Zygote.fork, request, cwd, full_env, rest[5],
                      (p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite))


class ServerPopen(subprocess.Popen):
    """A subprocess.Popen of ``python -m MODULE`` (or a script) forked by the fork server's
    spawner (ForkServer.popen): stdio, cwd, environment and start_new_session as asked; poll and
    wait ask the spawner, its parent, for the exit status; signals go to the pid as usual."""

    def __init__(self, server: "ForkServer", request: dict, args: Sequence[str], **kwargs: Any):
        self._server, self._request = server, request
        super().__init__(list(args), **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,  # type: ignore[override]
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        _forked_child(self, lambda request, stdio: self._server.spawn(request, stdio), self._request, cwd,
                      os.environ if env is None else env, rest[5],
                      (p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite))

    def _internal_poll(self, _deadstate=None, **_: Any):  # type: ignore[override]
        if self.returncode is None:
            try:
                self.returncode = self._server.exit_status(self.pid)
            except OSError:  # the server is gone, and with it the status
                self.returncode = _deadstate
        return self.returncode

    def _wait(self, timeout):  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._internal_poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode


def _spawner(sock: socket.socket) -> None:
    """The fork server's second loop, for the client's long-lived commands: fork one per request
    (its stdio received with it) and answer its pid; answer exit statuses when asked (the commands
    are this process's children); never returns."""
    codes: Dict[int, int] = {}
    try:
        for request, fds in _requests(sock):
            if "poll" in request:
                pid = request["poll"]
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                sock.send(json.dumps({"returncode": codes.get(pid)}).encode())
                continue
            pid = os.fork()
            if pid == 0:
                sock.close()
                _run_command(request, fds)
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"pid": pid}).encode())
    finally:
        os._exit(0)


def serve() -> None:
    """Read one JSON request per line on stdin; for each, fork, answer ``{"pid": ...}`` and then
    ``{"returncode": ...}`` on stdout (the raw file descriptor: nothing is buffered into a child)."""
    import importlib

    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    set_by_imports = sorted(k for k, v in os.environ.items() if before.get(k) != v)
    imported = sorted({name.split(".", 1)[0] for name in sys.modules})
    _SERVER.update(env=before, set_by_imports=set_by_imports, imported=imported)
    if len(sys.argv) > 1:  # the client's socket for long-lived commands (ForkServer.popen)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(sys.argv[1])
        if os.fork() == 0:
            _spawner(sock)
        sock.close()
    sys.stdout.flush()
    os.write(1, (json.dumps({"ready": True, "set_by_imports": set_by_imports, "imported": imported}) + "\n").encode())
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        os.write(1, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


class ForkServer:
    """The client: starts ``python -m llmexp.forkserver`` with ``env`` and runs commands in it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)
        self.lock, self.spawn_lock = threading.Lock(), threading.Lock()
        self.spawner: Optional[socket.socket] = None
        # A socket path is at most 107 bytes: under /tmp, whatever TMPDIR says
        short = "/tmp" if os.access("/tmp", os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix="llmexp-fork-", dir=short) as tmp, \
                socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
            path = str(Path(tmp) / "spawn")
            try:
                listener.bind(path)
                listener.listen(1)
            except OSError:  # no spawner: popen() starts fresh interpreters
                path = ""
            self.proc = subprocess.Popen([sys.executable, "-m", "llmexp.forkserver", *([path] if path else [])],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                         start_new_session=True)
            ready = json.loads(self._line(timeout=300) or "{}")
            if ready.get("ready") is not True:
                raise RuntimeError("the llmexp fork server did not start")
            if path:
                listener.settimeout(60)
                self.spawner, _ = listener.accept()
        self.set_by_imports: List[str] = ready["set_by_imports"]
        self.imported: List[str] = ready["imported"]

    def _ask(self, request: dict, fds: Sequence[int] = ()) -> dict:
        assert self.spawner is not None
        with self.spawn_lock:
            socket.send_fds(self.spawner, [json.dumps(request).encode()], list(fds))
            answer = self.spawner.recv(1 << 16)
        if not answer:
            raise OSError("the llmexp fork server's spawner is gone")
        return json.loads(answer)

    def spawn(self, request: dict, stdio: Sequence[int]) -> int:
        return self._ask(request, stdio)["pid"]

    def exit_status(self, pid: int) -> Optional[int]:
        return self._ask({"poll": pid})["returncode"]

    def popen(self, module: str, args: Sequence[str], script: bool = False, **kwargs: Any) -> subprocess.Popen:
        """Like ``subprocess.Popen([python, "-m", module, *args], **kwargs)`` (``script``: ``python
        module ...``) without waiting for it: a long-lived command (a server, a run to kill)."""
        argv = [sys.executable, *([] if script else ["-m"]), module, *args]
        if self.spawner is None:
            return subprocess.Popen(argv, **kwargs)
        return ServerPopen(self, {"script" if script else "module": module, "args": list(args)}, argv, **kwargs)

    def _line(self, timeout: Optional[float]) -> Optional[str]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode() if ready else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def can_run(self, env: Mapping[str, str]) -> bool:
        return self.alive() and not import_time_changes(self.env, env, self.set_by_imports, self.imported)

    def run(self, module: str, args: Sequence[str], cwd: Optional[Path], env: Mapping[str, str],
            timeout: float, script: bool = False) -> subprocess.CompletedProcess:
        """Like ``subprocess.run([python, "-m", module, *args], capture_output=True, text=True)``,
        or with ``script`` like ``subprocess.run([python, module, *args], ...)``."""
        argv = [sys.executable, *([] if script else ["-m"]), module, *args]
        with self.lock, tempfile.TemporaryDirectory(prefix="llmexp-fork-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"script" if script else "module": module, "args": list(args),
                       "cwd": str(Path(cwd or os.getcwd()).resolve()), "env": dict(env),
                       "stdout": str(out), "stderr": str(err)}
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = json.loads(self._line(timeout=60) or "{}")["pid"]
            answer = self._line(timeout=timeout)
            if answer is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._line(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(),
                                                err.read_text())
            return subprocess.CompletedProcess(argv, json.loads(answer)["returncode"],
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.spawner is not None:
            self.spawner.close()
        if self.alive():
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_servers: Dict[int, ForkServer] = {}


def shared_server(base_env: Mapping[str, str], env: Mapping[str, str], busy_ok: bool = False) -> Optional[ForkServer]:
    """This process's fork server (started on first use with ``base_env``), or None where it cannot
    run ``env``'s command faithfully or is busy with another thread's command (the caller then
    starts a fresh interpreter; ``busy_ok``: a ForkServer.popen does not wait for it)."""
    if os.environ.get("LLMEXP_TEST_FORKSERVER", "1") == "0" or not hasattr(os, "fork"):
        return None
    server = _servers.get(os.getpid())
    if server is None or not server.alive():
        import atexit

        server = _servers[os.getpid()] = ForkServer(base_env)
        atexit.register(server.close)
    if not server.can_run(env) or (server.lock.locked() and not busy_ok):
        return None
    return server


if __name__ == "__main__":
    serve()
