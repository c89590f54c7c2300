"""Weight sync learner (ZeRO-3, 2 ranks, gloo) -> one vLLM-CPU engine, for the tiny model and ~100M and ~500M Qwen3s.

Sides, interleaved over repeats, medians reported:
- bucketed: the default collective sync (256 MiB buckets: one ZeRO-3 gather + one broadcast per bucket);
- per_parameter: the same path with one bucket per tensor (one gather + one send per parameter);
- one_bucket: everything in a single flat buffer (the limit of the collective path);
- object_store: rank 0 gathers, one `ray.put`, the engine reads it.
Each side is checked first: after its sync the engine's logprobs equal the learner's (1e-4).
Goal: bucketed >= 5x faster than per-parameter and within 1.5x of one_bucket.

    python -m bench.weight_sync [--quick]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import tempfile
from pathlib import Path

import ray

from bench.common import print_table, write_result

SIDES = {
    "bucketed": ("collective", 256 << 20),
    "per_parameter": ("collective", 1),
    "one_bucket": ("collective", 1 << 40),
    "object_store": ("object_store", 256 << 20),
}
MODELS = {
    "tiny": {},
    "qwen3_100m": {
        "hidden_size": 768,
        "num_layers": 16,
        "num_heads": 12,
        "num_kv_heads": 4,
        "head_dim": 64,
        "intermediate_size": 2048,
    },
    "qwen3_500m": {
        "hidden_size": 1536,
        "num_layers": 20,
        "num_heads": 12,
        "num_kv_heads": 4,
        "head_dim": 128,
        "intermediate_size": 4096,
    },
}
REPEATS = {"tiny": 5, "qwen3_100m": 5, "qwen3_500m": 3}


def measure(model_name: str, repeats: int) -> dict:
    from safetensors import safe_open

    from cppo_rl.algorithms import default_config
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
    from cppo_rl.learner.worker import LearnerConfig, LearnerGroup
    from cppo_rl.rollout.engine import EngineConfig
    from cppo_rl.rollout.sampling import SamplingConfig
    from cppo_rl.rollout.worker import RolloutGroup, start_rollout_workers
    from cppo_rl.sync.weight_sync import WeightSync

    shape = TinyModelConfig(**MODELS[model_name], max_position_embeddings=256)
    directory = Path(tempfile.mkdtemp(prefix=f"bench_{model_name}_"))
    # built in a child process, so that the 500M model's random init does not stay in this one's memory
    context = multiprocessing.get_context("spawn")
    builder = context.Process(target=build_tiny_model, args=(shape, directory))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        raise RuntimeError(f"building the {model_name} model failed (exit code {builder.exitcode})")
    parameters = 0
    for shard in directory.glob("*.safetensors"):  # the file headers, not a second copy of the model
        with safe_open(str(shard), "pt") as weights:
            parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118 (not a dict)
    rollout = RolloutGroup(start_rollout_workers(EngineConfig(str(directory), max_model_len=128), 1, num_cpus=0.5))
    # plain SGD: a sync moves the parameters only, and AdamW's two moments would not fit beside a 500M model
    config = LearnerConfig(model_path=str(directory), responses_per_step=4, micro_batch_size=2, optimizer="sgd")
    learner = LearnerGroup(config, "cppo", default_config("cppo"), 2, num_cpus_per_rank=0.5)
    prompt = [[1, 2, 3, 4]]
    try:
        syncs = {
            name: WeightSync(learner, rollout, transport, bucket_bytes)
            for name, (transport, bucket_bytes) in SIDES.items()
        }
        for version, sync in enumerate(syncs.values(), start=1):  # correctness first
            sync.sync(version)
            batch = rollout.generate(prompt, SamplingConfig(n=2, max_tokens=8, logprobs_k=5, seed=0))
            used = batch.topk_ids >= 0
            gap = float((learner.logprobs(batch)[used] - batch.topk_logprobs[used]).abs().max())
            if gap > 1e-4:
                raise RuntimeError(f"after a sync the engine and the learner disagree by {gap:.2e}")
        seconds = {name: [] for name in syncs}
        for _ in range(repeats):
            for name, sync in syncs.items():
                seconds[name].append(sync.sync(version=0).seconds)
        nbytes = next(iter(syncs.values())).plan.nbytes
        buckets = {name: len(sync.plan.buckets) for name, sync in syncs.items()}
    finally:
        rollout.shutdown()
        learner.shutdown()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"parameters": parameters, "bytes": nbytes, "buckets": buckets, "seconds": seconds, "median": medians}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, 3 repeats")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=["tiny", "qwen3_100m"],
        help="qwen3_500m needs more than this 24 GiB machine has (two ranks and an engine on one node)",
    )
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        models = ["tiny"] if args.quick else args.models
        results = {name: measure(name, 3 if args.quick else REPEATS[name]) for name in models}
    finally:
        ray.shutdown()
    rows = []
    for name, result in results.items():
        m = result["median"]
        rows.append(
            [
                name,
                result["parameters"],
                result["bytes"] / 2**20,
                m["bucketed"],
                m["per_parameter"],
                m["one_bucket"],
                m["object_store"],
                m["per_parameter"] / m["bucketed"],
                m["bucketed"] / m["one_bucket"],
                result["bytes"] / m["bucketed"] / 2**20,
            ]
        )
    print_table(
        "weight sync, 2 ZeRO-3 ranks -> 1 vLLM-CPU engine (median seconds)",
        [
            "model",
            "params",
            "MiB",
            "bucketed",
            "per-param",
            "one bucket",
            "object store",
            "per-param/bucketed",
            "bucketed/one",
            "bucketed MiB/s",
        ],
        rows,
    )
    last = results[models[-1]]["median"]
    speedup, to_limit = last["per_parameter"] / last["bucketed"], last["bucketed"] / last["one_bucket"]
    path = write_result(
        "weight_sync" + ("_quick" if args.quick else ""),
        ratio=speedup,
        goal="bucketed >= 5x faster than per-parameter, within 1.5x of one flat buffer",
        met=speedup >= 5 and to_limit <= 1.5,
        ratio_to_limit=to_limit,
        models=results,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
