"""The bad-input battery's harness: one `Case` per row, run as the `llmtrain` CLI in a subprocess.

A row names the command line, the exit code, a phrase the one-line error must contain, a time
bound, and which paths must look afterwards exactly as they did before (nothing written,
nothing half-written). Every row also asserts: no `Traceback` anywhere in the output, and the
last line of stderr is `llmtrain: error: ...` (for a non-zero exit).

    CASES = [
        Case("pretrain-empty-yaml", ["pretrain", "{tmp}/empty.yaml", "run.dir={tmp}/run"],
             phrase="is empty", setup=lambda env: (env.tmp / "empty.yaml").write_text(""),
             unchanged=["{tmp}/run"]),
    ]
    test_case = battery(CASES)          # a parametrized test, one per row

Argument templates are `str.format`-ed with the `Env` fields: {tmp} (this row's own directory),
{data} and {tok} (the tiny prepared data and its tokenizer, shared read-only), {stories}
(stories260K, a released Hugging Face checkpoint), {config} (configs/tiny-pretrain.yaml),
{silent} (host:port of a local TCP server that accepts and never answers), {repo}.
Rows run two at a time, each in a process of its own forked from a warm interpreter
(tests/cli_zygote.py; `fresh=True` or an `env` runs a new `python -m llmtrain.cli`), each killed at 3x its bound + 30 s (a hang fails, it does not stall the suite) (the machine has 2 cores); each row's time is its own wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
PARALLEL = 2


@dataclass(frozen=True)
class Env:
    tmp: Path
    data: Path
    tok: Path
    stories: Path
    config: Path
    silent: str
    repo: Path = REPO

    def fmt(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class Case:
    id: str
    argv: Sequence[str]
    phrase: str
    """Must appear in the last line of stderr (case-sensitive)."""
    code: int = 2
    within_s: float = 60.0
    setup: Optional[Callable[[Env], None]] = None
    """Makes this row's broken input under env.tmp (runs before the `unchanged` snapshot)."""
    unchanged: Sequence[str] = ()
    """Paths (templates) that must be byte-for-byte as before the command, or still absent."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment: such a row runs in a new interpreter (the warm one imported with ours)."""
    stdin: Optional[str] = None
    fresh: bool = False
    """Run in a new interpreter (`python -m llmtrain.cli`) instead of a fork of the warm one."""


@dataclass
class Outcome:
    code: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    changed: list[str]


def snapshot(path: Path) -> Optional[dict[str, str]]:
    """{relative path: sha256 (files) or 'dir'} under `path`; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    state = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def describe_change(before: Optional[dict], after: Optional[dict]) -> str:
    if before is None:
        return f"created ({len(after or {})} entries: {sorted(after or {})[:5]})"
    if after is None:
        return "deleted"
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added[:5]}, removed {removed[:5]}, modified {modified[:5]}"


def run_case(case: Case, env: Env, timeout_s: float, zygote: Optional[Zygote] = None) -> Outcome:
    env.tmp.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(env)
    watched = [Path(env.fmt(p)) for p in case.unchanged]
    before = [snapshot(p) for p in watched]
    child_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    child_env.setdefault("DS_ACCELERATOR", "cpu")
    child_env.update({k: env.fmt(v) for k, v in case.env.items()})
    argv = [env.fmt(a) for a in case.argv]
    t0 = time.perf_counter()
    if case.fresh or case.env or zygote is None:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "llmtrain.cli", *argv],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=child_env,
                cwd=env.tmp,
                input=case.stdin,
            )
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, out, err = None, _text(e.stdout), _text(e.stderr)
    else:
        code, out, err = zygote.run(argv, env.tmp, child_env, case.stdin, timeout_s)
    seconds = time.perf_counter() - t0
    changed = [f"{p}: {describe_change(b, a)}" for p, b in zip(watched, before) if (a := snapshot(p)) != b]
    return Outcome(code, out, err, seconds, changed)


class Zygote:
    """tests/cli_zygote.py: a warm interpreter that forks one process per row (no 3-4 s of imports
    per row). Each row still runs `llmtrain.cli.main` in a process of its own, with its own
    working directory, environment, output files and exit code."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
        )
        assert json.loads(self.proc.stdout.readline()).get("ready"), "the warm CLI did not start"
        self.lock = threading.Lock()
        self.count = 0

    def run(self, argv: list[str], cwd: Path, env: dict, stdin: Optional[str], timeout_s: float):
        with self.lock:
            self.count += 1
            base = self.workdir / f"row-{self.count}"
        files = {k: str(base) + f".{k}" for k in ("out", "err", "rc", "in")}
        if stdin is not None:
            Path(files["in"]).write_text(stdin)
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdin": files["in"] if stdin is not None else None}
        request.update({k: files[k] for k in ("out", "err", "rc")})
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
        deadline = time.monotonic() + timeout_s
        rc = Path(files["rc"])
        while not rc.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        code = int(rc.read_text()) if rc.is_file() else None
        if code is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code, Path(files["out"]).read_text(errors="replace"), Path(files["err"]).read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def check(case: Case, outcome: Outcome) -> None:
    context = f"\n--- stdout\n{outcome.stdout[-2500:]}\n--- stderr\n{outcome.stderr[-2500:]}"
    assert outcome.code is not None, f"{case.id}: still running after {outcome.seconds:.0f} s (hang){context}"
    assert outcome.code == case.code, f"{case.id}: exit {outcome.code}, expected {case.code}{context}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, f"{case.id}: a traceback was printed{context}"
    if case.code != 0:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("llmtrain: error: "), f"{case.id}: no one-line error{context}"
        assert case.phrase in lines[-1], f"{case.id}: {case.phrase!r} not in {lines[-1]!r}"
    else:
        assert case.phrase in outcome.stdout + outcome.stderr, f"{case.id}: {case.phrase!r} not printed{context}"
    assert outcome.seconds <= case.within_s, f"{case.id}: took {outcome.seconds:.1f} s > {case.within_s} s{context}"
    assert not outcome.changed, f"{case.id}: output touched: {outcome.changed}{context}"


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)  # held open, never answered
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        for conn in self.held:
            conn.close()
        self.sock.close()


def battery(cases: Sequence[Case]):
    """A parametrized test over `cases`; all rows of the module run up front, PARALLEL at a time,
    and each test asserts its own row."""
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    results: dict[str, Outcome | BaseException] = {}

    def run_all(env: Env, selected: list[Case]) -> None:
        if results:
            return
        root = Path(tempfile.mkdtemp(prefix="rows-", dir=env.tmp))  # this module's rows, apart from other modules'
        zygote = Zygote(root)
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = {c.id: pool.submit(run_case, c, _row_env(env, root, c), 3 * c.within_s + 30, zygote) for c in selected}
            for key, fut in futures.items():
                try:
                    results[key] = fut.result()
                except Exception as err:  # the row's setup failed: that row fails, the others still count
                    results[key] = err
        zygote.close()

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_case(case: Case, battery_env: Env, request) -> None:
        chosen = {id(item.callspec.params.get("case")) for item in request.session.items if hasattr(item, "callspec")}
        run_all(battery_env, [c for c in cases if id(c) in chosen])  # the rows this session runs (-k)
        outcome = results[case.id]
        if isinstance(outcome, BaseException):
            raise outcome
        check(case, outcome)

    return test_case


def _row_env(env: Env, root: Path, case: Case) -> Env:
    return Env(root / case.id, env.data, env.tok, env.stories, env.config, env.silent)
