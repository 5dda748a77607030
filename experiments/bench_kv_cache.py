"""Long-context decode, side by side in one run on one GPU: offload.TieredKVCache, transformers'
offloaded cache and DynamicCache (where it fits). Prints a table and writes CSV; CUDA only.

A Llama-shaped 1.1B (hidden 2048, 22 layers, GQA 32/4, vocab 32000), bf16, batch 1, random
weights and prompt, greedy `generate` with the cache passed in unchanged. Each (cache, context)
runs in its own subprocess, so one run's memory (or out-of-memory failure) cannot touch the next.
Decode tokens/s is timed between the first and last generated token (a logits processor that
synchronises the GPU and stamps the time), prefill as the time to the first one; peak HBM is
torch.cuda.max_memory_allocated over the whole generate call, weights included.

    python experiments/bench_kv_cache.py                        # 32K and 128K, all three caches
    python experiments/bench_kv_cache.py --contexts 32768 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.child_run import cuda_missing, run_child
from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from offload.planning.model_shapes import MODELS

CACHES = ("tiered", "offloaded", "dynamic")
SHAPE = "llama-1.1b"
DEFAULT_CONTEXTS = (32768, 131072)


@dataclass
class Result:
    """One (cache, context) run, or why it did not finish."""

    source: str
    machine: str
    gpu: str
    cache: str
    context: int
    new_tokens: int
    status: str
    prefill_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_hbm_gib: float | None = None
    weights_gib: float | None = None
    decode_vs_offloaded: float | None = None
    peak_hbm_vs_offloaded: float | None = None
    same_tokens_as_dynamic: bool | None = None
    block_tokens: int | None = None
    hbm_layers: int | None = None
    h2d_gib_per_token: float | None = None
    transformers_version: str = ""
    torch_version: str = ""
    error: str = ""
    tokens: str = ""


def build_model(context: int):
    """The random-weight 1.1B Llama in bf16 on the GPU, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODELS[SHAPE].llama_config_kwargs(),
        max_position_embeddings=context + 1024,
        attn_implementation="sdpa",
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


class _TokenClock:
    """A logits processor that stamps the time of each generated token (after a GPU sync)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        import torch

        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def run_one(cache: str, context: int, new_tokens: int, block_tokens: int, hbm_layers: int) -> dict:
    """Generate ``new_tokens`` after a ``context``-token prompt with ``cache`` (child side)."""
    import warnings

    import torch
    import transformers
    from transformers import DynamicCache, LogitsProcessorList

    torch.manual_seed(0)
    model = build_model(context)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(0, MODELS[SHAPE].vocab, (1, context), device="cuda")
    clock = _TokenClock()
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "logits_processor": LogitsProcessorList([clock]),
    }
    tiered = None
    if cache == "tiered":
        tiered = _tiered_cache(model.config, context + new_tokens, block_tokens, hbm_layers)
        kwargs["past_key_values"] = tiered
    elif cache == "offloaded":
        kwargs["cache_implementation"] = "offloaded"
    else:
        kwargs["past_key_values"] = DynamicCache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # transformers 5.24 renames past_key_values to cache; older 5.x know only the old name.
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "prefill_s": clock.stamps[0] - start,
        "decode_tokens_per_s": (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0]),
        "peak_hbm_gib": peak,
        "weights_gib": weights_gib,
        "tokens": " ".join(str(t) for t in out[0, context:].tolist()),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if tiered is not None:
        stats = tiered.stats()
        result["h2d_gib_per_token"] = stats.h2d_nbytes / 2**30 / max(len(clock.stamps) - 1, 1)
        result["block_tokens"], result["hbm_layers"] = block_tokens, hbm_layers
        tiered.close()
    return result


def _tiered_cache(config, max_context_tokens: int, block_tokens: int, hbm_layers: int):
    import psutil

    from offload.kv_cache.cache import TieredKVCache

    # Leave a sixth of RAM to the process itself and the page cache; the planner places the
    # cache within it on this machine's tiers (all local DRAM on a one-node GPU machine).
    budgets = {"dram": int(psutil.virtual_memory().total * 5 / 6)}
    return TieredKVCache.for_model(
        config,
        max_context_tokens=max_context_tokens,
        policy="planned",
        budgets=budgets,
        block_tokens=block_tokens,
        hbm_layers=hbm_layers,
    )


def main(argv: list[str] | None = None) -> int:
    """Run every (context, cache) pair; print the table and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", nargs="*", type=int, default=list(DEFAULT_CONTEXTS))
    parser.add_argument("--caches", nargs="*", choices=CACHES, default=list(CACHES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-tokens", type=int, default=2048)
    parser.add_argument("--hbm-layers", type=int, default=2)
    parser.add_argument("--timeout-s", type=int, default=600, help="per run")
    parser.add_argument(
        "--echo-child-stderr",
        action="store_true",
        help="print the whole stderr of a run that fails or times out (first GPU runs)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if cuda_missing(
        "bench_kv_cache",
        "tests/test_kv_cache.py checks TieredKVCache's tokens and accounting on CPU",
    ):
        return 2
    if args.child:
        cache, context = args.child.split(":")
        measured = run_one(cache, int(context), args.new_tokens, args.block_tokens, args.hbm_layers)
        print(json.dumps(measured))
        return 0

    gpu = torch.cuda.get_device_name(0)
    machine = this_machine()
    results = []
    for context in args.contexts:
        for cache in args.caches:
            result = _run_child(cache, context, args, machine, gpu)
            results.append(result)
            print(
                f"{context:>7} {cache:>9}: {result.status}"
                + (f" {result.decode_tokens_per_s:.1f} tok/s" if result.decode_tokens_per_s else "")
                + (f" peak HBM {result.peak_hbm_gib:.2f} GiB" if result.peak_hbm_gib else ""),
                flush=True,
            )
    _add_ratios(results)
    frame = write_results([asdict(r) for r in results], RESULTS_DIR / machine / "kv_cache.csv")
    columns = [
        "context",
        "cache",
        "status",
        "prefill_s",
        "decode_tokens_per_s",
        "peak_hbm_gib",
        "decode_vs_offloaded",
        "peak_hbm_vs_offloaded",
        "same_tokens_as_dynamic",
    ]
    print(frame[columns].to_string(index=False))
    print(f"wrote {RESULTS_DIR / machine / 'kv_cache.csv'}")
    return 0


def _add_ratios(results: list[Result]) -> None:
    """Ratios against the offloaded cache, and token agreement with DynamicCache, per context."""
    by_key = {(r.context, r.cache): r for r in results if r.status == "ok"}
    for r in results:
        if r.status != "ok":
            continue
        base = by_key.get((r.context, "offloaded"))
        if base is not None:
            r.decode_vs_offloaded = r.decode_tokens_per_s / base.decode_tokens_per_s
            r.peak_hbm_vs_offloaded = r.peak_hbm_gib / base.peak_hbm_gib
        dynamic = by_key.get((r.context, "dynamic"))
        if dynamic is not None:
            r.same_tokens_as_dynamic = r.tokens == dynamic.tokens


def _run_child(cache: str, context: int, args, machine: str, gpu: str) -> Result:
    command = [
        sys.executable,
        __file__,
        "--child",
        f"{cache}:{context}",
        "--new-tokens",
        str(args.new_tokens),
        "--block-tokens",
        str(args.block_tokens),
        "--hbm-layers",
        str(args.hbm_layers),
    ]
    base = {
        "source": "measured",
        "machine": machine,
        "gpu": gpu,
        "cache": cache,
        "context": context,
        "new_tokens": args.new_tokens,
    }
    outcome = run_child(command, args.timeout_s, f"{cache}:{context}", args.echo_child_stderr)
    return Result(**base, status=outcome.status, error=outcome.error, **outcome.values)


if __name__ == "__main__":
    sys.exit(main())
