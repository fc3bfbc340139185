"""A warm `llmtrain` CLI for the bad-input battery: imports the heavy modules once, then runs each
request in a fresh forked process, so a row pays its command's work, not 3-4 s of imports.

Protocol (one JSON object per line on stdin, one answer per line on stdout):
    {"argv": [...], "cwd": DIR, "env": {...}, "out": FILE, "err": FILE, "rc": FILE, "stdin": FILE or null}
    -> {"pid": PID}
The command runs as `llmtrain ARGV` would (`llmtrain.cli.main`, atexit handlers, the exit code),
in its own session (kill the group to stop it); stdout and stderr go to the files, and the exit
code is written to the `rc` file when it ends. An exception escaping main prints its traceback
and exits 1, as the real entry point does. The process is a grandchild, re-parented away from
this server, so the server never waits on it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

PRELOAD = (
    "torch",
    "transformers",
    "datasets",
    "llmtrain.cli",
    "llmtrain.data.prepare",
    "llmtrain.data.tokenizer_train",
    "llmtrain.evaluate",
    "llmtrain.export",
    "llmtrain.generate",
    "llmtrain.launch",
    "llmtrain.quickstart",
    "llmtrain.tasks.dpo",
    "llmtrain.tasks.pretrain",
    "llmtrain.tasks.sft",
)


def child(request: dict) -> None:
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    sys.argv = ["llmtrain", *request["argv"]]
    from llmtrain.cli import main

    try:
        code = main(request["argv"])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        tmp = request["rc"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(code))
        os.replace(tmp, request["rc"])
        os._exit(code)


def serve() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmtrain, as `python -m` from the repo
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(read)
            pid = os.fork()
            if pid == 0:
                os.close(write)
                child(request)
            os.write(write, str(pid).encode())
            os._exit(0)
        os.close(write)
        pid = int(os.read(read, 32).decode())
        os.close(read)
        os.waitpid(middle, 0)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    serve()
