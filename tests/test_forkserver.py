"""llmexp.forkserver: a command forked from the server answers exactly as a fresh interpreter does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llmexp.forkserver import ForkServer, _servers, import_time_changes, shared_server
from llmexp.testing import OFFLINE_ENV


@pytest.fixture
def server() -> ForkServer:
    """The one run_cli uses in this process."""
    base = {**OFFLINE_ENV, **os.environ}
    s = shared_server(base, base)
    if s is None:
        started = _servers[os.getpid()]
        pytest.fail(f"the server cannot run this process's commands: "
                    f"{import_time_changes(started.env, base, started.set_by_imports)} changed since it started")
    return s


@pytest.mark.parametrize("args", [["trainer.max_steps=abc", "optim.lr=x"], ["--cfg", "job", "trainer.max_steps=7"]],
                         ids=["config error", "printed config"])
def test_a_forked_command_equals_a_fresh_interpreter(server, tmp_path, args):
    env = {**OFFLINE_ENV, **os.environ, "LLMEXP_TRACEBACK": "1"}
    forked = server.run("llmexp", args, cwd=tmp_path, env=env, timeout=120)
    fresh = subprocess.run([sys.executable, "-m", "llmexp", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.returncode == (2 if "optim.lr=x" in args else 0)
    assert ("Traceback" in forked.stderr) == (forked.returncode == 2)  # the environment reached the child


def test_the_child_has_its_own_directory_and_a_timeout_kills_it(server, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    r = server.run("zipfile", ["-c", "made.zip", "notes.txt"], cwd=tmp_path, env=dict(os.environ), timeout=60)
    assert r.returncode == 0 and r.stderr == "" and (tmp_path / "made.zip").is_file()  # relative to its cwd
    with pytest.raises(subprocess.TimeoutExpired):
        server.run("timeit", ["-n", "1000000000", "pass"], cwd=tmp_path, env=dict(os.environ), timeout=1)
    r = server.run("timeit", ["-n", "10", "pass"], cwd=tmp_path, env=dict(os.environ), timeout=60)
    assert r.returncode == 0 and "10 loops" in r.stdout  # the server goes on after a killed child


def test_import_time_variables_send_a_command_to_a_fresh_interpreter():
    base = {**OFFLINE_ENV, **os.environ}
    assert import_time_changes(base, {**base, "LLMEXP_TRACEBACK": "1", "HF_TOKEN": "t"}) == []
    assert import_time_changes(base, {**base, "PYTHONPATH": "/x", "HF_HUB_OFFLINE": "0"}) == ["HF_HUB_OFFLINE",
                                                                                              "PYTHONPATH"]
    # A PYTHONPATH a fork can take (absolute directories shadowing nothing the server imported)
    assert import_time_changes(base, {**base, "PYTHONPATH": "/x"}, imported=["torch"]) == []
    assert shared_server(base, {**base, "PYTHONPATH": "/x"}) is not None
    assert shared_server(base, {**base, "PYTHONPATH": "x"}) is None  # relative to the command's cwd


def test_an_in_process_run_leaves_later_commands_on_the_server(tmp_path):
    """An in-process run sets variables (llmexp.env's, Lightning's PL_GLOBAL_SEED): none of them may
    send the commands later tests run to a fresh interpreter (each one then pays the imports again)."""
    from llmexp.testing import train

    base = {**OFFLINE_ENV, **os.environ}
    train(tmp_path, ["trainer.max_steps=2", "trainer.val_check_interval=2"])
    assert os.environ.get("PL_GLOBAL_SEED") is not None  # the run did leave something behind
    after = {**OFFLINE_ENV, **os.environ}
    server = shared_server(base, base)
    assert server is not None
    assert import_time_changes(server.env, after, server.set_by_imports) == []
    assert shared_server(base, after) is server


CHILD = """
import json, os, sys
import importlib.util
print(json.dumps({"forked": "torch" in sys.modules, "pgid": os.getpgrp(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                  "x": os.environ.get("X"), "path1": sys.path[1],
                  "plugged": importlib.util.find_spec("plugged_mod") is not None}))
sys.stderr.write("to stderr")
sys.exit(int(sys.argv[1]))
"""

PARENT = """
import json, os, subprocess, sys, time
child = sys.argv[1]
out = {"pgid": os.getpgrp()}
r = subprocess.run([sys.executable, child, "3"], capture_output=True, text=True, env={**os.environ, "X": "1"},
                   cwd=os.path.dirname(child))
out["run"] = [r.returncode, json.loads(r.stdout), r.stderr]
here = os.path.dirname(child)
for name in ("plugins", "shadow", "relative"):
    where = name if name == "relative" else os.path.join(here, name)
    r = subprocess.run([sys.executable, child, "0"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": where}, cwd=here)
    out[name] = json.loads(r.stdout)
p = subprocess.Popen([sys.executable, "-m", "timeit", "-n", "1000000000", "pass"])
out["poll"] = p.poll()
p.kill()
out["killed"] = p.wait()
print(json.dumps(out))
if len(sys.argv) > 2:  # start one more that outlives the command's timeout
    p = subprocess.Popen([sys.executable, "-m", "timeit", "-n", "1000000000", "pass"])
    open(sys.argv[2], "w").write(str(p.pid))
    time.sleep(600)
"""


def test_python_commands_a_command_starts_are_forked_in_its_process_group(server, tmp_path):
    """Lightning's extra ranks, pipeline stages and sweep trials are ``python -m ...`` commands the
    command starts: they are forked too (torch already imported), with the cwd, environment,
    arguments and pipes asked for, in the command's process group; Popen waits, polls and kills
    them as its own children. One that changes an import-time variable gets a fresh interpreter."""
    import json
    import time

    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "parent.py").write_text(PARENT)
    for where in ("plugins", "relative"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "plugged_mod.py").write_text("")
    (tmp_path / "shadow" / "hydra").mkdir(parents=True)  # hydra: imported by the server
    (tmp_path / "shadow" / "hydra" / "__init__.py").write_text("")
    env = {**OFFLINE_ENV, **os.environ}
    r = server.run(str(tmp_path / "parent.py"), [str(tmp_path / "child.py")], cwd=tmp_path.parent, env=env,
                   timeout=120, script=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    code, child, stderr = out["run"]
    assert code == 3 and stderr == "to stderr"
    assert {k: child[k] for k in ("forked", "pgid", "cwd", "argv", "x", "plugged")} == {
        "forked": True, "pgid": out["pgid"], "cwd": str(tmp_path), "argv": ["3"], "x": "1", "plugged": False}
    # PYTHONPATH is read at start: a directory of plugins is put where a fresh interpreter puts it,
    # in a fork; one that would shadow a module the server imported, or a relative one, gets a
    # fresh interpreter.
    plugins = out["plugins"]
    assert plugins["forked"] and plugins["plugged"] and plugins["path1"] == str(tmp_path / "plugins")
    assert out["shadow"]["forked"] is False and out["shadow"]["path1"] == str(tmp_path / "shadow")
    assert out["relative"]["forked"] is False and out["relative"]["plugged"]
    assert out["poll"] is None and out["killed"] == -9
    # A timeout kills the command's whole process group, the commands it forked included.
    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        server.run(str(tmp_path / "parent.py"), [str(tmp_path / "child.py"), str(pid_file)], cwd=tmp_path,
                   env=env, timeout=5, script=True)
    pid = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the forked grandchild {pid} outlived the killed command")


def test_popen_module_forks_a_long_lived_command_the_test_polls_signals_and_waits_for(tmp_path):
    """llmexp.testing.popen_module (llmexp serve, a run to kill): a subprocess.Popen of a command
    forked from the server, with the pipes, cwd, environment and session asked for."""
    import json
    import signal
    import time

    from llmexp.forkserver import ServerPopen
    from llmexp.testing import popen_module

    (tmp_path / "child.py").write_text(CHILD)
    p = popen_module(str(tmp_path / "child.py"), ["5"], script=True, cwd=tmp_path, env={"X": "2"},
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert isinstance(p, ServerPopen) and p.returncode == 5 and err == "to stderr"
    child = json.loads(out)
    assert child["forked"] is True and child["cwd"] == str(tmp_path) and child["x"] == "2" and child["argv"] == ["5"]
    p = popen_module("timeit", ["-n", "1000000000", "pass"], start_new_session=True)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.5)
    assert p.poll() is None and os.getpgid(p.pid) == p.pid  # its own session and group
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    p = popen_module("timeit", ["-n", "10", "pass"], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.returncode == 0 and "10 loops" in p.stdout.read()
