"""DeepSpeed ZeRO-3 offload on the 7B shape, side by side in one run on one GPU: stock, with our
host placement (offload.deepspeed.enable) and our own runtime (offload.enable). Needs CUDA; not a test.

Each mode runs in its own subprocess so one mode's host and GPU memory cannot touch the next.
Random tokens, batch 1, bf16, gradient checkpointing in the DeepSpeed modes; ``--iters`` steps
with the first ``--warmup`` dropped; tokens/s = tokens / mean step time. The placed mode also
records the bytes our allocator holds per tensor class and per tier.

    python experiments/bench_deepspeed_placement.py                  # 7B, 4096 tokens, all modes
    python experiments/bench_deepspeed_placement.py --seq 8192 --policy local_only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_offload_training import build_model, host_budgets, time_steps
from experiments.common.child_run import cuda_missing, run_child
from experiments.common.results_io import RESULTS_DIR, machine_slug, write_results

MODES = ("deepspeed_zero3_stock", "deepspeed_zero3_placed", "offload_enable")
SHAPE = "7b"  # experiments.bench_offload_training.SHAPES["7b"]: MODELS["qwen2.5-7b"]


def zero3_offload_config() -> dict:
    """ZeRO-3 with parameters and optimizer offloaded to pinned CPU memory, bf16, batch 1.

    >>> zero3_offload_config()["zero_optimization"]["offload_param"]
    {'device': 'cpu', 'pin_memory': True}
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
        },
        "steps_per_print": 10**6,
    }


def _single_rank_env() -> None:
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29513"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(key, value)


def _trainer(mode: str, model, seq: int, policy: str):
    """(step(ids), extra columns) for ``mode``: the loop each mode's users would write."""
    import torch

    if mode == "offload_enable":
        import offload

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        sess = offload.enable(
            model, opt, activations="checkpoint", policy=policy, budgets=host_budgets()
        )

        def plain_step(ids):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

        def enable_extra() -> dict:
            tiers = {f"tier_{t}_gib": n / 2**30 for t, n in sess.memory.tier_nbytes().items()}
            return {"policy": sess.config.policy, **tiers}

        return plain_step, enable_extra
    _single_rank_env()
    model.gradient_checkpointing_enable()
    if mode == "deepspeed_zero3_stock":
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=zero3_offload_config())

        def extra() -> dict:
            return {}
    elif mode == "deepspeed_zero3_placed":
        import offload.deepspeed as ods

        run = ods.enable(
            model, config=zero3_offload_config(), policy=policy, budgets=host_budgets(), tokens=seq
        )
        engine = run.engine

        def extra() -> dict:
            usage = {
                f"placed_{cls}_gib": n / 2**30 for cls, n in run.placement.nbytes_by_class().items()
            }
            for row in run.placement.allocator.usage():
                if row.node is None:
                    usage[f"tier_{row.tier}_gib"] = row.used_nbytes / 2**30
            unplaced = sum(run.placement.unplaced_nbytes_by_class().values())
            return {
                "policy": policy,
                "unplaced": len(run.placement.unplaced),
                "unplaced_gib": unplaced / 2**30,
                "predicted_step_s": run.plan.predicted_step_s,
                **usage,
            }
    else:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")

    def ds_step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    return ds_step, extra


def run_one(mode: str, seq: int, iters: int, warmup: int, policy: str) -> dict:
    """Train ``iters`` steps of ``mode`` in this process; return its measurements (child side)."""
    import torch

    torch.manual_seed(0)
    model = build_model(SHAPE, seq)
    step, extra = _trainer(mode, model, seq, policy)
    measured = time_steps(step, model.config.vocab_size, seq, iters, warmup)
    measured["step_s"] = measured.pop("iter_s")
    return {**measured, **extra()}


def _run_child(mode: str, args: argparse.Namespace, base: dict) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--seq", str(args.seq)]
    command += ["--iters", str(args.iters), "--warmup", str(args.warmup), "--policy", args.policy]
    outcome = run_child(command, args.timeout_s, mode, args.echo_child_stderr)
    return {
        **base,
        "mode": mode,
        "status": outcome.status,
        "error": outcome.error,
        **outcome.values,
    }


def main(argv: list[str] | None = None) -> int:
    """Run each mode in its own process; print the table and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--policy", default="cxl_aware", help="for deepspeed_zero3_placed")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=int, default=1200, help="per mode")
    parser.add_argument("--machine", help="results folder name (default: from the GPU name)")
    parser.add_argument(
        "--echo-child-stderr",
        action="store_true",
        help="print the whole stderr of a run that fails or times out (first GPU runs)",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if cuda_missing(
        "bench_deepspeed_placement", "tests/test_deepspeed_plugin.py covers correctness on CPU"
    ):
        return 2
    if args.child:
        result = run_one(args.child, args.seq, args.iters, args.warmup, args.policy)
        print(json.dumps(result))
        return 0
    gpu = torch.cuda.get_device_name(0)
    machine = args.machine or machine_slug(gpu)
    base = {"source": "measured", "machine": machine, "gpu": gpu, "shape": SHAPE, "seq": args.seq}
    rows = []
    for mode in args.modes:
        row = _run_child(mode, args, base)
        rows.append(row)
        rate = f" {row['tokens_per_s']:,.0f} tok/s" if row.get("tokens_per_s") else ""
        print(f"{mode:>24}: {row['status']}{rate} {row['error']}", flush=True)
    stock = next((r.get("tokens_per_s") for r in rows if r["mode"] == MODES[0]), None)
    for row in rows:
        row["vs_deepspeed_stock"] = (
            row["tokens_per_s"] / stock if stock and row.get("tokens_per_s") else None
        )
    path = Path(RESULTS_DIR) / machine / "deepspeed_placement.csv"
    frame = write_results(rows, path)
    print(frame.to_string(index=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
