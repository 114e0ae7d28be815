"""`dtp-ext train` under several processes: 2 ranks, gloo, CPU, tiny subsets of the shipped MNIST.

One torch.multiprocessing spawn (module fixture `ranks`) runs every 2-process job through the
CLI entry point, `dtp_ext.cli.main(["train", ...])`, in both ranks; a test-only patch of
Run.finish dumps each rank's state after each job, and an audit hook on rank 1 records any file
it opens for writing under the run folders. One more test goes through torchrun itself.
"""

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dtp_ext
from dtp_ext.cli import main
from dtp_ext.train.events import event_files
from tests.helpers.tiny_runs import tiny_args

pytestmark = pytest.mark.integration  # 2-process spawns

WORLD = 2
# 96 images, global batch 32 (16 per rank): 3 steps per epoch.
TINY = tiny_args()


def jobs(out):
    ldrl = ["--algorithm", "ldrl", "--epochs", "2", *TINY]
    return [
        ("ldrl-full", ldrl + ["--out", f"{out}/full"]),
        ("ldrl-part1", ldrl + ["--out", f"{out}/parts", "--max-steps", "2"]),
        ("ldrl-part2", ["--resume", "--out", f"{out}/parts", "--max-steps", "4", "--no-progress"]),
        ("ldrl-part3", ["--resume", "--out", f"{out}/parts", "--no-progress"]),
        # One step, no feedback iterations (no noise): exactly one process on the global batch;
        # batch 31 gives uneven shards (15 + 16 images), so the gradient weighting matters.
        (
            "ldrl-k0",
            [
                "--algorithm",
                "ldrl",
                "--feedback-iterations",
                "0",
                "--max-steps",
                "1",
                *TINY,
                "--batch-size",
                "31",
                "--out",
                f"{out}/ldrl-k0",
            ],
        ),
        ("bp", ["--algorithm", "bp", "--max-steps", "1", *TINY, "--out", f"{out}/bp"]),
        *(
            (a, ["--algorithm", a, "--max-steps", "2", *TINY, "--out", f"{out}/{a}"])
            for a in ("dtp", "tp", "drl")
        ),
        # a checkpoint written by one process (the fixture), continued by two
        (
            "from-1-process",
            ["--resume", "--out", f"{out}/from-1-process", "--max-steps", "2", "--no-progress"],
        ),
        # SIGTERM to rank 1 alone during step 1 (SIGNALLED): both ranks stop after step 2, then resume
        ("sigterm-rank1", ldrl + ["--out", f"{out}/signalled", "--log-every", "4"]),
        ("sigterm-resume", ["--resume", "--out", f"{out}/signalled", "--no-progress"]),
    ]


SIGNALLED = {"sigterm-rank1": 1}  # job: the rank that gets a SIGTERM after its first step
EXIT_CODES = {"sigterm-rank1": 143}  # the others exit 0


def _write_recorder(root: str, writes: list):
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args):
        if event == "open" and isinstance(args[0], str):
            path, mode, oflags = args
            writing = any(c in mode for c in "wax+") if mode else bool((oflags or 0) & flags)
        elif event in ("os.rename", "os.remove", "os.mkdir", "tempfile.mkstemp"):
            path, writing = str(args[0]), True
        else:
            return
        if writing and os.path.abspath(path).startswith(root):
            writes.append((event, path))

    return hook


def _nonfinite_gradient_on_rank_1(rank, out):
    """A NaN in one forward gradient of rank 1 only: both ranks refuse the step, none hangs."""
    from dtp_ext.train import TrainConfig, TrainingDiverged, resolve
    from dtp_ext.train.batches import train_batches
    from dtp_ext.train.runner import Run

    cfg = resolve(
        TrainConfig(
            algorithm="ldrl",
            train_subset=96,
            test_subset=64,
            batch_size=32,
            probe_batch_size=16,
            progress=False,
            threads=1,
            out=out,
        )
    )
    run = Run(cfg, log=lambda *a: None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    inner = run.algorithm.train_step

    def poisoned(x, y, step):
        result = inner(x, y, step)
        if rank == 1:
            run.model.conv2.weight.grad[0, 0, 0, 0] = float("nan")
        return result

    run.algorithm.train_step = poisoned
    _, x, y = next(
        train_batches(
            run.train_set,
            32,
            cfg.seed,
            0,
            0,
            run.info.mean,
            run.info.std,
            False,
            "cpu",
            rank,
            WORLD,
        )
    )
    try:
        run._train_step(x, y, 32)
        message = None
    except TrainingDiverged as exc:
        message = str(exc)
    unchanged = all(torch.equal(before[n], p) for n, p in run.model.named_parameters())
    return {
        "message": message,
        "unchanged": unchanged,
        "global_step": run.global_step,
        "momentum": len(run.optimizer.state),
    }


def _worker(rank, init_file, out, dump_dir):
    from dtp_ext.train import checkpoint as ckpt
    from dtp_ext.train import runner

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    writes, results = [], {}
    if rank:
        sys.addaudithook(_write_recorder(os.path.abspath(out), writes))
    current = {}
    finish = runner.Run.finish

    def dumping_finish(self):  # test-only: each rank's state once the job is done
        summary = finish(self)
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "algorithm": self.algorithm.state_dict(),
                "rng": ckpt.rng_states(),
                "global_step": self.global_step,
                "summary_processes": summary["processes"],
            },
            os.path.join(dump_dir, f"{current['name']}-rank{rank}.pt"),
        )
        return summary

    runner.Run.finish = dumping_finish
    train_step = runner.Run._train_step

    def signalling_step(self, *args, **kwargs):  # test-only: a real SIGTERM to this rank alone
        value = train_step(self, *args, **kwargs)
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return value

    try:
        for name, argv in jobs(out):
            current["name"] = name
            runner.Run._train_step = signalling_step if SIGNALLED.get(name) == rank else train_step
            results[name] = main(["train", *argv])
        runner.Run._train_step = train_step
        results["nonfinite"] = _nonfinite_gradient_on_rank_1(rank, os.path.join(out, "nonfinite"))
        # Every rank done with its collectives before either tears the group down (as in
        # tests/distributed/test_trainer_ddp.py: a rank aborting in gloo teardown was seen once in CI).
        dist.barrier()
    finally:
        runner.Run.finish = finish
        dist.destroy_process_group()
    torch.save({"results": results, "writes": writes}, os.path.join(dump_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    out, dumps = root / "runs", root / "dumps"
    dumps.mkdir()
    assert (
        main(
            [
                "train",
                "--algorithm",
                "drl",
                "--max-steps",
                "1",
                *TINY,
                "--out",
                str(out / "from-1-process"),
            ]
        )
        == 0
    )
    mp.spawn(_worker, args=(str(root / "init"), str(out), str(dumps)), nprocs=WORLD, join=True)
    info = [torch.load(dumps / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    def dump(name, rank):
        return torch.load(dumps / f"{name}-rank{rank}.pt", weights_only=False)

    return {"out": out, "info": info, "dump": dump}


def _same(a, b, path=""):
    """Bitwise equality of nested state dicts; returns the first differing key or None."""
    if isinstance(a, torch.Tensor):
        return None if torch.equal(a, b) else path
    if isinstance(a, np.ndarray):
        return None if np.array_equal(a, b) else path
    if isinstance(a, dict):
        if set(a) != set(b):
            return path + "{keys}"
        return next((d for k in a for d in [_same(a[k], b[k], f"{path}/{k}")] if d), None)
    if isinstance(a, (list, tuple)):
        return next(
            (d for i, (x, y) in enumerate(zip(a, b)) for d in [_same(x, y, f"{path}[{i}]")] if d),
            None,
        )
    return None if a == b else path


def test_every_job_finishes_on_both_ranks(ranks):
    for r in range(WORLD):
        codes = {k: v for k, v in ranks["info"][r]["results"].items() if k != "nonfinite"}
        assert codes == {name: EXIT_CODES.get(name, 0) for name, _ in jobs("")}, (r, codes)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(ranks):
    """Rank 1 alone got SIGTERM during step 1; the stop request travels in step 2's all-reduce,
    so both ranks stopped after step 2 (exit 143 on both), the checkpoint holds step 2 and both
    ranks' RNG states, and resuming it ends bitwise like the uninterrupted 2-process run."""
    assert False not in [ranks["info"][r]["results"]["sigterm-rank1"] == 143 for r in range(WORLD)]
    for r in range(WORLD):
        assert (
            _same(
                ranks["dump"]("ldrl-full", r)["model"], ranks["dump"]("sigterm-resume", r)["model"]
            )
            is None
        )
    a = torch.load(ranks["out"] / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(ranks["out"] / "signalled" / "checkpoint.pt", weights_only=False)
    assert b["global_step"] == 6 and len(b["rank_rng"]) == 2
    for key in ("model", "optimizer", "algorithm", "counter", "rank_rng"):
        assert _same(a[key], b[key]) is None, f"{key}: {_same(a[key], b[key])}"
    steps = [
        json.loads(line)
        for line in (ranks["out"] / "signalled" / "steps.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r.get("kind")) for r in steps] == [
        (1, None),  # the run's first step
        (2, "stop"),
        (3, "epoch"),
        (4, None),
        (6, "epoch"),
    ]


@pytest.mark.parametrize(
    "job", ["ldrl-full", "ldrl-part3", "ldrl-k0", "bp", "dtp", "tp", "drl", "from-1-process"]
)
def test_ranks_end_with_identical_weights_and_feedback(ranks, job):
    r0, r1 = ranks["dump"](job, 0), ranks["dump"](job, 1)
    for key in ("model", "optimizer", "algorithm"):
        assert _same(r0[key], r1[key]) is None, (
            f"{job}: {key} differs between ranks at {_same(r0[key], r1[key])}"
        )
    assert r0["global_step"] == r1["global_step"] > 0
    # the feedback noise streams differ between ranks (independent noise per image)
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])
    if job in ("dtp", "tp", "ldrl-full"):  # their feedback weights did train
        initial = ranks["dump"]("bp", 0)["model"]  # bp leaves them at their (same-seed) init
        assert not torch.equal(r0["model"]["fc.feedback_weight"], initial["fc.feedback_weight"])


def test_only_rank_0_writes(ranks):
    assert ranks["info"][1]["writes"] == []
    full = ranks["out"] / "full"
    [events] = event_files(full)  # TensorBoard's, rank 0's alone
    assert {p.name for p in full.iterdir()} == {
        events.name,
        "config.json",
        "metrics.jsonl",
        "steps.jsonl",
        "summary.json",
        "accuracy.png",
        "alignment.png",
        "checkpoint.pt",
    }
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"]["world_size"] == 2 and summary["processes"][
        "per_process_batch_size"
    ] == [16, 16]
    assert summary["global_step"] == 6 and summary["finished"]


def test_resume_with_another_number_of_processes(ranks):
    state = torch.load(ranks["out"] / "from-1-process" / "checkpoint.pt", weights_only=False)
    assert state["global_step"] == 2 and state["world_size"] == 2 and len(state["rank_rng"]) == 2


def test_distributed_resume_is_bitwise_identical(ranks):
    """Stopped after 2 and 4 steps and resumed, against 6 uninterrupted steps: bitwise equal on
    the CPU (same data shards, every rank's RNG state restored, gloo's sums in a fixed order)."""
    a = torch.load(ranks["out"] / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(ranks["out"] / "parts" / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6 and a["world_size"] == 2
    for key in ("model", "optimizer", "algorithm", "counter", "rank_rng"):
        assert _same(a[key], b[key]) is None, f"{key}: {_same(a[key], b[key])}"
    for r in range(WORLD):
        assert (
            _same(ranks["dump"]("ldrl-full", r)["model"], ranks["dump"]("ldrl-part3", r)["model"])
            is None
        )
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "time" not in k}  # noqa: E731
    lines = [
        (ranks["out"] / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "parts")
    ]
    assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]] and len(lines[0]) == 2


def _single_process(tmp_path, argv):
    out = tmp_path / "single"
    assert main(["train", *argv, "--out", str(out)]) == 0
    return torch.load(out / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize(
    "job, argv",
    [
        (
            "ldrl-k0",
            [
                "--algorithm",
                "ldrl",
                "--feedback-iterations",
                "0",
                "--max-steps",
                "1",
                *TINY,
                "--batch-size",
                "31",
            ],
        ),
        ("bp", ["--algorithm", "bp", "--max-steps", "1", *TINY]),
    ],
)
def test_one_step_on_2_ranks_equals_one_process_on_the_global_batch(ranks, tmp_path, job, argv):
    """The averaged gradient is the global batch's (shards weighted by size), up to float32
    summation order: within 1e-6. With feedback iterations, L-DRL's forward step uses feedback
    weights trained with noise that each rank draws for its own shard, which one process does
    not reproduce (tests/distributed/test_trainer_ddp.py checks the feedback sync with explicit noise)."""
    single = _single_process(tmp_path, argv)
    ours = torch.load(ranks["out"] / job / "checkpoint.pt", weights_only=False)
    assert single["global_step"] == ours["global_step"] == 1
    for key, value in single["model"].items():
        torch.testing.assert_close(ours["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert single["counter"]["seen"] == ours["counter"]["seen"] == (31 if job == "ldrl-k0" else 32)
    assert single["counter"]["top1"] == ours["counter"]["top1"]


def test_nonfinite_gradient_on_one_rank_is_refused_by_both(ranks):
    for r in range(WORLD):
        result = ranks["info"][r]["results"]["nonfinite"]
        assert result["message"] and "non-finite" in result["message"], result
        assert "conv2.weight" in result["message"] and "refused" in result["message"]
        assert result["unchanged"] and result["global_step"] == 0 and result["momentum"] == 0


@pytest.mark.parametrize("augment", [False, True])
def test_shards_of_every_global_batch_are_the_single_process_batch(augment):
    """Rank shards, concatenated in rank order, are exactly the one-process batch, augmentation
    included (drawn for the whole global batch); steps resume alike."""
    from dtp_ext.train.batches import steps_per_epoch, train_batches
    from dtp_ext.train.datasets import load_split

    data = load_split("mnist", None, "train").subset(23)
    args = (0.1, 0.3, augment, "cpu")
    single = list(train_batches(data, 7, 5, 1, 0, *args))
    for world in (2, 3):
        shards = [
            list(train_batches(data, 7, 5, 1, 0, *args, rank=r, world=world)) for r in range(world)
        ]
        steps = 4 if world == 2 else 3  # 7, 7, 7 and 2 images: 3 processes cannot share the last 2
        assert len(single) == 4 and all(len(s) == steps for s in shards)
        for step in range(steps):
            x = torch.cat([s[step][1] for s in shards])
            y = torch.cat([s[step][2] for s in shards])
            assert torch.equal(x, single[step][1]) and torch.equal(y, single[step][2])
        resumed = list(train_batches(data, 7, 5, 1, 2, *args, rank=1, world=world))
        assert torch.equal(resumed[0][1], shards[1][2][1])
    assert (
        steps_per_epoch(23, 7, 1) == 4
        and steps_per_epoch(23, 7, 2) == 4
        and steps_per_epoch(23, 7, 3) == 3
    )


def test_torchrun_entry_point(tmp_path):
    """The real launcher: `python -m torch.distributed.run --nproc_per_node 2 -m dtp_ext.train`."""
    out = tmp_path / "run"
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(dtp_ext.__file__).resolve().parent.parent),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "dtp_ext.train",
            "--algorithm",
            "ldrl",
            "--max-steps",
            "2",
            *TINY,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert "16/16 per process, 2 processes, gloo" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"]["world_size"] == 2 and summary["global_step"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
