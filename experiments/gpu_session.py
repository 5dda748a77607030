"""One time-boxed session on the lent GPU machine: run the benchmark and test stages in priority
order under a budget, log everything, and pack what they wrote into one tarball for $OUT.

It orchestrates the scripts under experiments/ (and pytest, the profiler CLI); it must not measure
anything itself, and it never edits results it did not see a stage write.

    python3 experiments/gpu_session.py --dry-run             # the stage table, commands, estimates
    PYTHONUNBUFFERED=1 python3 experiments/gpu_session.py --out-dir "$OUT"     # on the GPU machine
    python3 experiments/gpu_session.py --unpack gpu_results.tar.gz           # back here, to commit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
RESULTS_REL = "experiments/results"
TARBALL_NAME = "gpu_results.tar.gz"
LOG_NAME = "gpu_session.log"
SUMMARY_NAME = "summary.json"
# Inside the tarball every path must start with one of these; --unpack refuses anything else.
UNPACK_PREFIXES = ("experiments/results/", "docs/")
# The device machine returns at most 16 MiB per file; warn well before that.
TARBALL_WARN_NBYTES = 15 << 20
# Seconds kept back from the budget for the last pack and summary.
PACK_RESERVE_S = 15
# A killed stage gets this long between SIGTERM and SIGKILL.
KILL_GRACE_S = 5
DEFAULT_BUDGET_S = 520
# The device call: 600 s is the most one command may run; the budget above leaves the wheel
# install, interpreter start and the last pack inside it.
DEVICE_TIMEOUT_S = 600
WHEELS_INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    '--target "$HOME/site" .whl/*.whl'
)

_PYTHON = "{python}"
_MACHINE = "{machine}"
_SESSION = "{session}"  # experiments/results/<machine>/gpu_session: junit, reports, env, summary


@dataclass(frozen=True)
class Stage:
    """One step of the session: a command run from the repo root under its own time cap.

    ``argv`` may hold ``{python}``, ``{machine}`` (the results folder name, as
    experiments.common.results_io.this_machine gives it) and ``{session}`` (this session's folder under
    experiments/results/<machine>/). ``requires`` lists files (same placeholders) an earlier stage
    must have written; without them the stage is skipped, not failed.
    """

    name: str
    issue: int
    argv: tuple[str, ...]
    cap_s: int
    estimate_s: int
    what: str
    needs_gpu: bool = True
    needs_deepspeed: bool = False
    part: int = 1
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    """What the session found on this machine before running anything."""

    machine: str
    cuda: bool
    deepspeed: bool


@dataclass
class StageResult:
    """How one stage ended: ok, failed, timeout, skipped or error (could not start)."""

    name: str
    issue: int
    part: int
    command: str
    status: str
    rc: int | None = None
    seconds: float = 0.0
    cap_s: int = 0
    estimate_s: int = 0
    reason: str = ""


@dataclass
class SessionSummary:
    """Everything summary.json holds: where, when, with what, and each stage's outcome."""

    machine: str
    cuda: bool
    deepspeed: bool
    budget_s: float
    started_utc: str
    python: str = field(default_factory=platform.python_version)
    elapsed_s: float = 0.0
    stages: list[StageResult] = field(default_factory=list)
    packed_files: list[str] = field(default_factory=list)
    tarball_nbytes: int = 0


def _py(*args: str) -> tuple[str, ...]:
    return (_PYTHON, *args)


def all_stages() -> tuple[Stage, ...]:
    """Every stage, part 1 first, each part in priority order.

    >>> [s.name for s in all_stages()][:3]
    ['env', 'pytest-gpu', 'host-buffer']
    """
    s = _SESSION
    results = f"{RESULTS_REL}/{_MACHINE}"
    report = f"{s}/offload_enable_llama-1.1b_8192_report.csv"
    return (
        Stage("env", 2, _py("experiments/gpu_session.py", "--env-report", f"{s}/environment.json"),
              60, 15, "nvidia-smi, versions, imports, NUMA, memlock, THP", needs_gpu=False),
        Stage("pytest-gpu", 5,
              _py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                  f"--junitxml={s}/pytest_gpu.xml"),
              120, 35, "the gpu-marked tests (copy streams, pinned round trip, enable on CUDA, "
              "profiler bandwidth): their first CUDA run"),
        Stage("host-buffer", 2,
              _py("experiments/bench_host_buffer.py", "--sizes", "1MiB", "16MiB", "256MiB",
                  "1GiB", "--alloc-gib", "2", "--trials", "5"),
              120, 45, "H2D/D2H of placed buffers vs pin_memory; 2 GiB pinned allocation"),
        Stage("kernel-ours", 3,
              _py("-c", "import sys; from optim_cpu.native import load_kernel; "
                        "sys.exit(load_kernel() is None)"),
              120, 30, "build our C++ CPU-Adam kernel (the cache is empty on a fresh machine)",
              needs_gpu=False),
        Stage("kernel-deepspeed", 5,
              _py("-c", "from deepspeed.ops.op_builder import CPUAdamBuilder; "
                        "CPUAdamBuilder().load()"),
              180, 60, "JIT-build DeepSpeedCPUAdam once, outside the training runs' timeouts",
              needs_gpu=False, needs_deepspeed=True),
        Stage("train-1.1b-8k", 5,
              _py("experiments/bench_offload_training.py", "--shapes", "llama-1.1b", "--seqs",
                  "8192", "--modes", "gpu_checkpointing", "offload_enable", "torch_save_on_cpu",
                  "deepspeed_zero2_offload", "--iters", "4", "--warmup", "1", "--timeout-s", "150",
                  "--echo-child-stderr", "--report-dir", s),
              420, 180, "1.1B at 8K: checkpointing, offload.enable, save_on_cpu, ZeRO-2 offload"),
        Stage("profile", 4,
              _py("-m", "profilers.cli", "all", "--quick", "--out", results),
              180, 60, "offload-profile all --quick: profile.json + profile_*.csv"),
        Stage("kv-32k", 7,
              _py("experiments/bench_kv_cache.py", "--contexts", "32768", "--new-tokens", "16",
                  "--timeout-s", "150", "--echo-child-stderr"),
              300, 90, "decode at 32K: TieredKVCache vs offloaded vs DynamicCache"),
        Stage("validate", 6,
              _py("experiments/validate_simulator.py", "--report", report, "--model",
                  "llama-1.1b", "--seq", "8192", "--profile", f"{results}/profile.json",
                  "--out", f"{s}/validation_llama-1.1b_8192.csv"),
              60, 10, "simulator error against offload.enable's own per-step report",
              needs_gpu=False, requires=(report, f"{results}/profile.json")),
        Stage("cpu-adam", 3,
              _py("experiments/bench_cpu_adam.py", "--sizes", "21M", "--threads", "1,4,8,16",
                  "--omp-wait-policy", "ACTIVE"),
              180, 80, "CPU AdamW 21M elements, 1-16 threads: ours vs torch vs DeepSpeed",
              needs_gpu=False),
        Stage("contention", 3,
              _py("experiments/bench_optimizer_contention.py", "--threads", "8"),
              120, 40, "optimizer vs (emulated) DMA per contention policy, 8 threads",
              needs_gpu=False),
        Stage("contention-runtime", 17,
              _py("experiments/bench_contention_runtime.py", "--device", "cuda", "--threads", "8"),
              150, 60, "the runtime's host step against its own real H2D+D2H copies, contention "
              "policy on vs off side by side (the CPU figure used an emulated DMA thread)"),
        Stage("dashboard", 9,
              _py("experiments/bench_dashboard_overhead.py", "--device", "cuda", "--rounds", "6",
                  "--steps", "6", "--warmup", "2", "--out", f"{s}/dashboard_overhead.csv",
                  "--svg", f"{s}/dashboard_gpu.svg"),
              90, 40, "the live dashboard during a GPU run (SVG for docs/) and its cost there"),
        Stage("doctor", 10,
              _py("-m", "offload.tools.cli", "doctor", "--model", "qwen2.5-7b", "--seq", "32768",
                  "--activations", "checkpoint", "--loss-chunk-tokens", "4096"),
              60, 10, "offload doctor on a real GPU machine, and whether 7B at 32K fits its host "
              "memory as train-7b-32k runs it (exit 1 = a check failed)", needs_gpu=False),
        Stage("pytest-all", 5,
              _py("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={s}/pytest_all.xml"),
              420, 240, "the whole suite with CUDA present (buffers really get pinned)", part=2),
        Stage("train-1.1b-32k", 5,
              _py("experiments/bench_offload_training.py", "--shapes", "llama-1.1b", "--seqs",
                  "32768", "--iters", "4", "--warmup", "1", "--timeout-s", "240",
                  "--echo-child-stderr", "--report-dir", s),
              540, 400, "1.1B at 32K, all four modes", part=2),
        Stage("train-7b-4k", 5,
              _py("experiments/bench_offload_training.py", "--shapes", "7b", "--seqs", "4096",
                  "--iters", "4", "--warmup", "1", "--timeout-s", "240", "--echo-child-stderr",
                  "--report-dir", s),
              540, 420, "7B at 4K, all four modes", part=2),
        Stage("train-7b-32k", 5,
              _py("experiments/bench_offload_training.py", "--shapes", "7b", "--seqs", "32768",
                  "--modes", "offload_enable", "deepspeed_zero2_offload", "--iters", "3",
                  "--warmup", "1", "--timeout-s", "270", "--echo-child-stderr", "--report-dir", s,
                  "--loss-chunk-tokens", "4096"),
              560, 480, "7B at 32K: offload.enable (chunked loss) vs ZeRO-2 offload", part=2),
        Stage("deepspeed-zero3-7b", 8,
              _py("experiments/bench_deepspeed_placement.py", "--seq", "4096", "--iters", "4",
                  "--warmup", "1", "--timeout-s", "270", "--echo-child-stderr"),
              560, 480, "ZeRO-3 7B at 4K: stock vs our placement vs offload.enable",
              needs_deepspeed=True, part=2),
        Stage("validate-measured", 6,
              _py("experiments/validate_simulator.py", "--measure", "gpu-1.1b", "--rounds", "1",
                  "--steps", "5"),
              240, 100, "simulator vs measured DRAM-only runs at 395M/616M/1.1B (fitted on 616M; "
              "prior rates: reference/MEASURED.md)", part=2),
        Stage("kv-128k", 7,
              _py("experiments/bench_kv_cache.py", "--contexts", "131072", "--new-tokens", "16",
                  "--timeout-s", "240", "--echo-child-stderr"),
              480, 300, "decode at 128K: TieredKVCache vs offloaded vs DynamicCache", part=2),
    )  # fmt: skip


def select_stages(
    stages: Sequence[Stage], part: str = "1", names: Sequence[str] | None = None
) -> list[Stage]:
    """The stages to run: those named (in list order), else those of ``part`` ("1", "2", "all").

    >>> [s.name for s in select_stages(all_stages(), names=["validate", "env"])]
    ['env', 'validate']
    >>> select_stages(all_stages(), names=["nope"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown stage 'nope'; write some of: env, pytest-gpu, host-buffer, ...
    """
    known = {s.name for s in stages}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            listed = ", ".join(s.name for s in stages)
            raise ValueError(f"unknown stage {unknown[0]!r}; write some of: {listed}")
        return [s for s in stages if s.name in names]
    if part == "all":
        return list(stages)
    if part not in ("1", "2"):
        raise ValueError(f"--part {part!r} is not a part; write 1, 2 or all")
    return [s for s in stages if s.part == int(part)]


def session_dir(machine: str) -> str:
    """This session's folder, relative to the repo root.

    >>> session_dir("nvidia-h100-80gb-hbm3")
    'experiments/results/nvidia-h100-80gb-hbm3/gpu_session'
    """
    return f"{RESULTS_REL}/{machine}/gpu_session"


def resolve(arg: str, machine: str, python: str = sys.executable) -> str:
    """``arg`` with its placeholders filled in (plain replacement: code in ``-c`` keeps braces).

    >>> resolve("{session}/x.csv", "gpu")
    'experiments/results/gpu/gpu_session/x.csv'
    """
    return (
        arg.replace(_SESSION, session_dir(machine))
        .replace(_MACHINE, machine)
        .replace(_PYTHON, python)
    )


def skip_reason(stage: Stage, probe: Probe, remaining_s: float, root: Path = ROOT) -> str | None:
    """Why ``stage`` cannot run now, or None when it can.

    >>> cpu = Probe("cpu-2core", cuda=False, deepspeed=False)
    >>> skip_reason(all_stages()[2], cpu, 500)
    'needs a CUDA GPU: torch.cuda.is_available() is False here'
    >>> skip_reason(all_stages()[0], cpu, 5)
    'estimate 15 s does not fit the 5 s left of the budget'
    """
    if stage.needs_gpu and not probe.cuda:
        return "needs a CUDA GPU: torch.cuda.is_available() is False here"
    if stage.needs_deepspeed and not probe.deepspeed:
        return (
            "needs deepspeed, which is not importable; carry the wheels of "
            "../shared/tools/device-wheels.sh (carry ['.whl']) and install them first"
        )
    missing = [r for r in stage.requires if not (root / resolve(r, probe.machine)).exists()]
    if missing:
        return f"needs {', '.join(resolve(m, probe.machine) for m in missing)} (an earlier stage)"
    if stage.estimate_s > remaining_s:
        return (
            f"estimate {stage.estimate_s} s does not fit the {remaining_s:.0f} s left of the budget"
        )
    return None


def probe_machine(python: str = sys.executable, root: Path = ROOT) -> Probe:
    """Machine name and CUDA as the benches see them, asked in a child so this process never
    creates a CUDA context (it would hold GPU memory for the whole session).

    >>> probe_machine().machine  # doctest: +SKIP
    'nvidia-h100-80gb-hbm3'
    """
    code = (
        "import json, torch; from experiments.common.results_io import this_machine; "
        "print(json.dumps({'machine': this_machine(), 'cuda': torch.cuda.is_available()}))"
    )
    done = subprocess.run(
        [python, "-c", code], cwd=root, env=_child_env(root), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not import torch to probe this machine:\n{done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    has_ds = importlib.util.find_spec("deepspeed") is not None
    return Probe(machine=found["machine"], cuda=bool(found["cuda"]), deepspeed=has_ds)


def _child_env(root: Path) -> dict[str, str]:
    # The repo is not pip-installed on the GPU machine: the stages import it from the root.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in paths:
        paths.append(str(root))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


class SessionLog:
    """Lines to stdout and to the log file at once (the device returns only a tail of stdout)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("ab")
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._file.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def line(self, text: str) -> None:
        self.write(f"[gpu_session {time.strftime('%H:%M:%S')}] {text}\n".encode())

    def close(self) -> None:
        self._file.close()


def run_command(
    argv: Sequence[str], cap_s: float, log: SessionLog, root: Path
) -> tuple[str, int | None]:
    """Run ``argv`` from ``root`` in its own process group, its output streamed to ``log``;
    kill the whole group when it outlives ``cap_s``. Returns (status, exit code).

    >>> run_command(["sleep", "9"], 1, SessionLog(Path("/tmp/x.log")), ROOT)  # doctest: +SKIP
    ('timeout', -15)
    """
    try:
        proc = subprocess.Popen(
            list(argv), cwd=root, env=_child_env(root), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        log.line(f"could not start: {exc}")
        return "error", None
    reader = threading.Thread(target=_copy_output, args=(proc, log), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(cap_s, 1))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, status = proc.returncode, "timeout"
    reader.join(timeout=KILL_GRACE_S)
    return status, rc


def _copy_output(proc: subprocess.Popen, log: SessionLog) -> None:
    for chunk in iter(proc.stdout.readline, b""):
        log.write(chunk)


def _kill_group(proc: subprocess.Popen) -> None:
    # The benches start their own children; only the group takes them all down.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def snapshot(results_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``results_dir``, keyed by path, to tell what changed.

    >>> snapshot(Path("/no/such/folder"))
    {}
    """
    if not results_dir.exists():
        return {}
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in results_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def changed_files(before: dict[str, tuple[int, int]], results_dir: Path) -> list[Path]:
    """Files under ``results_dir`` that are new or changed since ``before``.

    >>> changed_files({}, Path("/no/such/folder"))
    []
    """
    after = snapshot(results_dir)
    return sorted(Path(p) for p, key in after.items() if before.get(p) != key)


def pack(files: Sequence[Path], root: Path, tarball: Path) -> int:
    """Write ``files`` (paths under ``root``) into ``tarball`` (gzip); returns its size in bytes.

    Written to a temporary name and renamed, so a session killed mid-pack keeps the last whole one.

    >>> pack([ROOT / "experiments/results/README.md"], ROOT, Path("/tmp/r.tar.gz")) > 0  # doctest: +SKIP
    True
    """
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.resolve().relative_to(root.resolve()).as_posix())
    partial.replace(tarball)
    return tarball.stat().st_size


def unsafe_members(tar: tarfile.TarFile) -> list[str]:
    """Members that --unpack refuses: not a plain file or folder, or outside UNPACK_PREFIXES.

    >>> import io
    >>> buf = io.BytesIO()
    >>> with tarfile.open(fileobj=buf, mode="w") as t:
    ...     t.addfile(tarfile.TarInfo("experiments/results/../../etc/x"))
    >>> _ = buf.seek(0)
    >>> unsafe_members(tarfile.open(fileobj=buf))
    ["experiments/results/../../etc/x: has '..'; pack paths under experiments/results/ or docs/"]
    """
    refused = []
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            refused.append(f"{member.name}: not a plain file or folder (links are refused)")
        elif path.is_absolute() or ".." in path.parts:
            refused.append(
                f"{member.name}: has '..'; pack paths under experiments/results/ or docs/"
            )
        elif not (member.name + "/").startswith(UNPACK_PREFIXES):
            refused.append(f"{member.name}: outside {' and '.join(UNPACK_PREFIXES)}")
    return refused


def unpack(tarball: Path, root: Path = ROOT) -> list[str]:
    """Extract a session's tarball into the repo at ``root``; refuse it whole if any member is
    unsafe (see :func:`unsafe_members`). Returns the paths written.

    >>> unpack(Path("gpu_results.tar.gz"))  # doctest: +SKIP
    ['experiments/results/nvidia-h100-80gb-hbm3/host_buffer.csv', ...]
    """
    with tarfile.open(tarball) as tar:
        refused = unsafe_members(tar)
        if refused:
            raise ValueError(
                f"{tarball} was not unpacked; these members are refused:\n  " + "\n  ".join(refused)
            )
        names = [m.name for m in tar.getmembers() if m.isfile()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # Pythons before the extraction filters: members were checked above
            tar.extractall(root)
    return names


@dataclass
class SessionConfig:
    """Where the session runs and writes, and how long it may take."""

    out_dir: Path
    budget_s: float = DEFAULT_BUDGET_S
    root: Path = ROOT
    python: str = sys.executable


def run_session(stages: Sequence[Stage], probe: Probe, config: SessionConfig) -> SessionSummary:
    """Run ``stages`` in order under the budget; after each, rewrite summary.json and the
    tarball in ``config.out_dir``, so a session cut short still leaves what it measured.

    >>> run_session(all_stages(), probe_machine(), SessionConfig(Path("out")))  # doctest: +SKIP
    """
    start = time.monotonic()
    deadline = start + config.budget_s - PACK_RESERVE_S
    root, out_dir = config.root, config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir = root / RESULTS_REL
    own_dir = root / session_dir(probe.machine)
    own_dir.mkdir(parents=True, exist_ok=True)
    before = snapshot(results_dir)
    log = SessionLog(out_dir / LOG_NAME)
    summary = SessionSummary(
        machine=probe.machine,
        cuda=probe.cuda,
        deepspeed=probe.deepspeed,
        budget_s=config.budget_s,
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    log.line(
        f"machine {probe.machine}, cuda {probe.cuda}, deepspeed {probe.deepspeed}, "
        f"budget {config.budget_s:.0f} s, {len(stages)} stages"
    )
    try:
        for stage in stages:
            argv = [resolve(a, probe.machine, config.python) for a in stage.argv]
            result = StageResult(
                stage.name,
                stage.issue,
                stage.part,
                shlex.join(argv),
                "skipped",
                cap_s=stage.cap_s,
                estimate_s=stage.estimate_s,
            )
            remaining = deadline - time.monotonic()
            reason = skip_reason(stage, probe, remaining, root)
            if reason:
                result.reason = reason
                log.line(f"SKIP {stage.name} (issue {stage.issue}): {reason}")
            else:
                cap = min(stage.cap_s, remaining)
                log.line(
                    f"START {stage.name} (issue {stage.issue}, cap {cap:.0f} s, "
                    f"estimate {stage.estimate_s} s): {result.command}"
                )
                began = time.monotonic()
                result.status, result.rc = run_command(argv, cap, log, root)
                result.seconds = round(time.monotonic() - began, 1)
                if result.status == "timeout":
                    result.reason = f"killed after its cap of {cap:.0f} s"
                log.line(f"END {stage.name}: {result.status} rc={result.rc} in {result.seconds} s")
            summary.stages.append(result)
            _save(summary, start, before, log, root, results_dir, own_dir, out_dir)
    finally:
        log.line(f"done in {time.monotonic() - start:.0f} s; results in {out_dir / TARBALL_NAME}")
        _save(summary, start, before, log, root, results_dir, own_dir, out_dir)
        log.close()
    return summary


def _save(summary, start, before, log, root, results_dir, own_dir, out_dir) -> None:
    summary.elapsed_s = round(time.monotonic() - start, 1)
    text = json.dumps(asdict(summary), indent=2)
    (out_dir / SUMMARY_NAME).write_text(text)
    (own_dir / SUMMARY_NAME).write_text(text)
    # The log travels in the tarball too, so it can be committed next to the results.
    (own_dir / LOG_NAME).write_bytes(log.path.read_bytes())
    files = changed_files(before, results_dir)
    summary.packed_files = [p.resolve().relative_to(root.resolve()).as_posix() for p in files]
    summary.tarball_nbytes = pack(files, root, out_dir / TARBALL_NAME)
    if summary.tarball_nbytes > TARBALL_WARN_NBYTES:
        log.line(
            f"WARNING: {TARBALL_NAME} is {summary.tarball_nbytes} bytes; the device returns "
            "at most 16 MiB per file"
        )
    (out_dir / SUMMARY_NAME).write_text(json.dumps(asdict(summary), indent=2))


def device_command() -> str:
    """The one command a session with a GPU gives the device tool (with carry [".whl"]).

    >>> "gpu_session.py --out-dir" in device_command()
    True
    """
    return (
        f'({WHEELS_INSTALL} || echo "no deepspeed wheels: its stages will be skipped"); '
        'export PYTHONPATH="$HOME/site:$PWD"; '
        'PYTHONUNBUFFERED=1 python3 experiments/gpu_session.py --out-dir "$OUT"'
    )


def print_plan(stages: Sequence[Stage], probe: Probe, budget_s: float) -> None:
    """The stage table with exact commands, estimates and what the budget would skip.

    >>> print_plan(all_stages(), Probe("cpu-2core", False, False), 520)  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(
        title=f"GPU session plan (machine here: {probe.machine}, budget {budget_s:.0f} s)"
    )
    for column in (
        "#",
        "stage",
        "issue",
        "part",
        "est s",
        "cap s",
        "needs",
        "if run now",
        "command",
    ):
        table.add_column(column, overflow="fold")
    left = budget_s - PACK_RESERVE_S
    for i, stage in enumerate(stages, 1):
        needs = ", ".join(
            n for n, on in (("gpu", stage.needs_gpu), ("deepspeed", stage.needs_deepspeed)) if on
        )
        # Assume every stage takes its estimate, and ignore files earlier stages would write.
        planned = Probe(probe.machine, cuda=True, deepspeed=True)
        reason = skip_reason(Stage(**{**asdict(stage), "requires": ()}), planned, left)
        if reason is None:
            left -= stage.estimate_s
        argv = shlex.join(resolve(a, probe.machine, "python3") for a in stage.argv)
        table.add_row(
            str(i),
            stage.name,
            str(stage.issue),
            str(stage.part),
            str(stage.estimate_s),
            str(stage.cap_s),
            needs or "-",
            "runs" if reason is None else "skipped: over budget",
            argv,
        )
    console.print(table)
    total = sum(s.estimate_s for s in stages)
    console.print(
        f"estimates add up to {total} s against a budget of {budget_s:.0f} s "
        f"({PACK_RESERVE_S} s kept for packing)",
        highlight=False,
    )
    console.print(
        f"device call (carry ['.whl'], timeout_s {DEVICE_TIMEOUT_S}):\n  {device_command()}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "afterwards, here: python3 experiments/gpu_session.py --unpack "
        f"/work/.device/<files_at>/{TARBALL_NAME}",
        highlight=False,
        soft_wrap=True,
    )


def env_report(path: Path) -> int:
    """Print and write (JSON) what the session runs on: GPU, driver, versions, NUMA, limits.

    >>> env_report(Path("/tmp/environment.json"))  # doctest: +SKIP
    0
    """
    report: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "memlock_soft": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0],
    }
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    report["thp"] = thp.read_text().strip() if thp.exists() else "absent"
    report["nvidia_smi"] = _command_text(["nvidia-smi"])
    report["nvidia_smi_topo"] = _command_text(["nvidia-smi", "topo", "-m"])
    for name in ("torch", "transformers", "deepspeed", "pandas", "numpy", "pynvml", "psutil"):
        report[f"{name}_version"] = _version(name)
    import torch

    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = props.name
        report["gpu_total_gib"] = round(props.total_memory / 2**30, 2)
        report["gpu_capability"] = f"{props.major}.{props.minor}"
    from allocators.sysfs_topology import discover

    topology = discover()
    report["numa_nodes"] = [
        {"node": n.id, "kind": n.kind, "total_gib": round(n.total_bytes / 2**30, 1)}
        for n in topology.nodes
    ]
    for module in ("offload", "allocators", "optim_cpu", "profilers"):
        report[f"import_{module}"] = _version_or_error(module)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0


def _command_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]} did not run: {exc}"
    return (done.stdout + done.stderr).strip()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-ml-py" if name == "pynvml" else name)
    except PackageNotFoundError:
        return None


def _version_or_error(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as exc:  # the report says what broke; the session goes on
        return f"import failed: {type(exc).__name__}: {exc}"
    return "ok"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script.

    >>> build_parser().parse_args(["--dry-run", "--part", "2"]).part
    '2'
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where the log, summary.json and the tarball go (default $OUT, "
        "else ./gpu-session-out)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"wall seconds for all stages (default {DEFAULT_BUDGET_S})",
    )
    parser.add_argument("--part", default="1", help="1 (default), 2 or all")
    parser.add_argument("--stages", default=None, help="comma list of stage names (any part)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--list", action="store_true", help="print stage names and exit")
    parser.add_argument(
        "--unpack",
        type=Path,
        metavar="TARBALL",
        help="extract a session's tarball into this repo and exit",
    )
    parser.add_argument("--env-report", type=Path, metavar="JSON", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the session (or --dry-run, --list, --unpack); the exit code is 0 unless the session
    itself could not run: stage failures are in summary.json, not in the exit code.

    >>> main(["--list", "--stages", "env"])  # doctest: +NORMALIZE_WHITESPACE
    env issue 2 part 1 nvidia-smi, versions, imports, NUMA, memlock, THP
    0
    """
    args = build_parser().parse_args(argv)
    if args.env_report:
        return env_report(args.env_report)
    if args.unpack:
        for name in unpack(args.unpack):
            print(f"unpacked {name}")
        return 0
    names = [n.strip() for n in args.stages.split(",") if n.strip()] if args.stages else None
    try:
        stages = select_stages(all_stages(), args.part, names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for stage in stages:
            print(f"{stage.name}\tissue {stage.issue}\tpart {stage.part}\t{stage.what}")
        return 0
    probe = probe_machine()
    if args.dry_run:
        print_plan(stages, probe, args.budget_s)
        return 0
    out_dir = args.out_dir or Path(os.environ.get("OUT") or "gpu-session-out")
    summary = run_session(stages, probe, SessionConfig(out_dir=out_dir, budget_s=args.budget_s))
    for r in summary.stages:
        print(f"{r.name:>20} {r.status:>8} rc={r.rc} {r.seconds:>6.1f} s {r.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
