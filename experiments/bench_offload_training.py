"""Long-context fine-tuning throughput and memory, side by side in one run on one GPU: no offload
(gradient checkpointing), offload.enable(), DeepSpeed ZeRO-2 with the optimizer offloaded, and
torch's save_on_cpu. Prints a table and writes CSV; it needs a CUDA GPU and never runs in tests.

Each (mode, shape, sequence) runs in its own subprocess so one mode's memory (or its out-of-memory
failure) cannot touch the next. Random tokens, batch 1, bf16, 7 iterations with the first 2
dropped (the paper's protocol); tokens/s = tokens / mean iteration time.

    python experiments/bench_offload_training.py                       # every shape and mode
    python experiments/bench_offload_training.py --shapes llama-1.1b --seqs 8192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.child_run import cuda_missing, run_child
from experiments.common.results_io import RESULTS_DIR, machine_slug, write_results
from offload.planning.model_shapes import MODELS

MODES = ("gpu_checkpointing", "offload_enable", "deepspeed_zero2_offload", "torch_save_on_cpu")

# reference/MEASURED.md's Llama-shaped 1.1B, and the 7B shape of issue 5 (Qwen2.5-7B-like, built
# as a Llama: no q/k/v bias).
SHAPES = {
    "llama-1.1b": MODELS["llama-1.1b"].llama_config_kwargs(),
    "7b": MODELS["qwen2.5-7b"].llama_config_kwargs(),
}
DEFAULT_RUNS = (("llama-1.1b", 8192), ("llama-1.1b", 32768), ("7b", 4096), ("7b", 32768))


@dataclass
class Result:
    """One (mode, shape, seq) run: throughput and memory, or why it did not finish."""

    machine: str
    gpu: str
    mode: str
    shape: str
    seq: int
    status: str
    tokens_per_s: float | None = None
    iter_s: float | None = None
    peak_hbm_gib: float | None = None
    host_rss_gib: float | None = None
    loss_chunk_tokens: int | None = None
    error: str = ""
    source: str = "measured"


def build_model(shape: str, seq: int):
    """A randomly initialised LlamaForCausalLM of ``shape`` in bf16 on the GPU (SDPA attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(seq, 4096),
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.train()
    return model


def time_steps(step, vocab: int, seq: int, iters: int, warmup: int) -> dict:
    """Run ``step(ids)`` ``iters`` times on random tokens; tokens/s and step time over the steps
    after ``warmup``, peak HBM after warm-up, and the process's peak RSS (child side).
    """
    import resource

    import torch

    times = []
    for i in range(iters):
        ids = torch.randint(0, vocab, (1, seq), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == warmup - 1:
            torch.cuda.reset_peak_memory_stats()
    kept = times[warmup:] or times
    mean = sum(kept) / len(kept)
    return {
        "tokens_per_s": seq / mean,
        "iter_s": mean,
        "peak_hbm_gib": torch.cuda.max_memory_allocated() / 2**30,
        "host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    }


def run_one(
    mode: str,
    shape: str,
    seq: int,
    iters: int,
    warmup: int,
    report_dir: Path | None = None,
    loss_chunk_tokens: int | None = None,
) -> dict:
    """Train ``iters`` steps in this process and return the measurements (child side).

    With ``report_dir``, the offload_enable mode also writes its per-step report there as
    ``offload_enable_<shape>_<seq>_report.csv`` (what experiments/validate_simulator.py reads).
    """
    import torch

    torch.manual_seed(0)
    model = build_model(shape, seq)
    report_path = report_dir / f"{mode}_{shape}_{seq}_report.csv" if report_dir else None
    step, cleanup = _trainer(mode, model, report_path, loss_chunk_tokens, seq)
    measured = time_steps(step, SHAPES[shape]["vocab_size"], seq, iters, warmup)
    cleanup()
    return measured


def _trainer(
    mode: str,
    model,
    report_path: Path | None = None,
    loss_chunk_tokens: int | None = None,
    seq: int = 8192,
):
    """(step(ids), cleanup()) for ``mode``; the loop each mode's users would write. The
    offload_enable cleanup writes the session's per-step report to ``report_path`` when given;
    ``loss_chunk_tokens`` is passed to offload.enable (the other modes use transformers' loss).
    """
    import torch

    if mode == "gpu_checkpointing":
        model.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        return _plain_step(model, opt), lambda: None
    if mode == "torch_save_on_cpu":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step(ids):
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        return step, lambda: None
    if mode == "offload_enable":
        import offload

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        sess = offload.enable(
            model,
            opt,
            activations="checkpoint",
            budgets=host_budgets(),
            loss_chunk_tokens=loss_chunk_tokens,
            plan_tokens=seq,  # host memory for this sequence's layer checkpoints
        )

        def cleanup():
            if report_path is not None:
                report_path.parent.mkdir(parents=True, exist_ok=True)
                sess.report().to_csv(report_path, index=False)
            sess.disable()

        return _plain_step(model, opt), cleanup
    if mode == "deepspeed_zero2_offload":
        return _deepspeed_trainer(model)
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def _plain_step(model, opt):
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def host_budgets() -> dict[str, int]:
    import psutil

    # Leave the process itself, pinned staging and the page cache 16 GiB (or a sixth of a small
    # machine): 7B at 32K needs about 105 GiB of host memory under offload.enable.
    total = psutil.virtual_memory().total
    return {"dram": int(max(total * 5 / 6, total - (16 << 30)))}


def _deepspeed_trainer(model):
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    model.gradient_checkpointing_enable()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
        },
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    return step, lambda: None


def main(argv: list[str] | None = None) -> int:
    """Run every requested (shape, seq) with every mode; print the table and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES))
    parser.add_argument("--seqs", nargs="*", type=int)
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=int, default=900, help="per run")
    parser.add_argument("--machine", help="results folder name (default: from the GPU name)")
    parser.add_argument(
        "--report-dir",
        type=Path,
        help="also write offload_enable's per-step report CSV here (for validate_simulator)",
    )
    parser.add_argument(
        "--echo-child-stderr",
        action="store_true",
        help="print the whole stderr of a run that fails or times out (first GPU runs)",
    )
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=None,
        help="offload_enable computes the loss this many tokens at a time (7B at 32K: the "
        "[tokens, vocab] fp32 logits alone take 20 GB); other modes keep transformers' loss",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if cuda_missing(
        "bench_offload_training", "the CPU tests in tests/test_enable.py cover correctness here"
    ):
        return 2
    if args.child:
        mode, shape, seq = args.child.split(":")
        measured = run_one(
            mode, shape, int(seq), args.iters, args.warmup, args.report_dir, args.loss_chunk_tokens
        )
        print(json.dumps(measured))
        return 0

    gpu = torch.cuda.get_device_name(0)
    machine = args.machine or machine_slug(gpu)
    runs = [
        (shape, seq)
        for shape, seq in DEFAULT_RUNS
        if (not args.shapes or shape in args.shapes) and (not args.seqs or seq in args.seqs)
    ]
    results = []
    for shape, seq in runs:
        for mode in args.modes:
            result = _run_child(mode, shape, seq, args, machine, gpu)
            results.append(result)
            print(
                f"{shape:>10} {seq:>6} {mode:>24}: {result.status}"
                + (f" {result.tokens_per_s:,.0f} tok/s" if result.tokens_per_s else "")
                + (f" peak HBM {result.peak_hbm_gib:.1f} GiB" if result.peak_hbm_gib else ""),
                flush=True,
            )
    return _write(results, machine)


def _run_child(mode, shape, seq, args, machine, gpu) -> Result:
    command = [
        sys.executable,
        __file__,
        "--child",
        f"{mode}:{shape}:{seq}",
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
    ]
    if args.report_dir is not None:
        command += ["--report-dir", str(args.report_dir.resolve())]
    chunked = args.loss_chunk_tokens if mode == "offload_enable" else None
    if chunked is not None:
        command += ["--loss-chunk-tokens", str(chunked)]
    outcome = run_child(command, args.timeout_s, f"{mode}:{shape}:{seq}", args.echo_child_stderr)
    result = Result(
        machine=machine, gpu=gpu, mode=mode, shape=shape, seq=seq, status=outcome.status
    )
    result.error = outcome.error
    result.loss_chunk_tokens = chunked
    for key, value in outcome.values.items():
        setattr(result, key, value)
    return result


def _write(results: list[Result], machine: str) -> int:
    import pandas as pd

    frame = pd.DataFrame([asdict(r) for r in results])
    for ratio, baseline in (
        ("vs_gpu_checkpointing", "gpu_checkpointing"),
        ("vs_deepspeed", "deepspeed_zero2_offload"),
    ):
        base = frame[frame["mode"] == baseline].set_index(["shape", "seq"])["tokens_per_s"]
        frame[ratio] = [
            row.tokens_per_s / base.get((row.shape, row.seq))
            if row.tokens_per_s and base.get((row.shape, row.seq))
            else None
            for row in frame.itertuples()
        ]
    path = RESULTS_DIR / machine / "bench_offload_training.csv"
    write_results(frame, path)
    print(frame.to_string(index=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
