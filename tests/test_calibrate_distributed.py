"""Data-parallel calibrate: 2 gloo processes write the stats file of one process, byte for byte, and resume like it.

The workers run the `calibrate` command the way `torchrun` / `accelerate launch` start it (RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_* in the environment; accelerate's PartialState sets up gloo). The pipeline has two
transformers (Wan2.2-style experts): each step runs one of them, so at some steps a transformer has no record on
any process (steps 0-1: the first, step 2: the second). 3 samples over 2 processes: the second round leaves
process 1 idle.

Stats files are compared exactly: header metadata and every tensor (dtype, shape, values). Not their bytes:
safetensors writes the header's metadata keys in an order that varies from process to process (a hash map), so
two one-process runs differ there too.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import PartialState
from click.testing import CliRunner
from safetensors import safe_open

from nabla_convert.calibrate import Stats
from nabla_convert.calibrate.distributed import Processes
from nabla_convert.cli import main
from nabla_convert.errors import DeviceError
from nabla_convert.folders import write_marker
from nabla_convert.models.tiny import tiny_wan_pipeline

PROMPTS = ("a red ball", "a blue cube", "a green tree")  # 3 samples: not a multiple of 2 processes
PLAN = {"steps": 3, "sample-steps": 3, "query-blocks": 2, "height": 240, "width": 256, "frames": 17}
EXCHANGES_PER_ROUND = 3  # one per measured step


def calibrate_args(model: Path, prompts: Path, out: Path) -> list[str]:
    options = itertools.chain(*(["--" + key, str(value)] for key, value in PLAN.items()))
    return ["calibrate", str(model), "--prompts", str(prompts), "--out", str(out), *options, "--target-density", "0.5"]


class StopAtExchange:
    """Counts Processes.exchange calls; raises KeyboardInterrupt at call `stop` on every process (a killed job)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop: int | None = None) -> None:
        self.calls, self.stop = 0, stop
        original = Processes.exchange

        def exchange(processes, records, shapes):
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
            return original(processes, records, shapes)

        monkeypatch.setattr(Processes, "exchange", exchange)


def stats_content(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a stats file."""
    with safe_open(path, "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def assert_same_stats(path: Path, reference: Path) -> None:
    (meta, tensors), (expected_meta, expected) = stats_content(path), stats_content(reference)
    assert meta == expected_meta and tensors.keys() == expected.keys()
    for key, tensor in tensors.items():
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: Path) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    args = lambda out: calibrate_args(folder / "pipe", folder / "prompts.txt", folder / out)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        calls = StopAtExchange(patch)
        result = CliRunner().invoke(main, args("two"))
        assert result.exit_code == 0, result.output
        assert ("wrote" in result.output) == (rank == 0)  # one report line per run, from process 0
        assert calls.calls == 2 * EXCHANGES_PER_ROUND  # rounds (0, 1), (2,)

        # killed in the second round, after its first measured step; then the same command resumes
        StopAtExchange(patch, stop=EXCHANGES_PER_ROUND + 2)
        result = CliRunner().invoke(main, args("killed"))
        assert result.exit_code != 0
        PartialState().wait_for_everyone()  # the killed job has ended on every process (process 0 saved last)
        killed = Stats.load(folder / "killed" / "stats.safetensors").components
        assert (killed["transformer"].sample, killed["transformer_2"].sample) == ([0, 0, 1, 1, 2], [0, 1])
        if rank == 0:
            (folder / "partial.safetensors").write_bytes((folder / "killed" / "stats.safetensors").read_bytes())

        calls = StopAtExchange(patch)
        result = CliRunner().invoke(main, args("killed"))
        assert result.exit_code == 0, result.output
        assert calls.calls == EXCHANGES_PER_ROUND  # samples 0 and 1 were kept: only sample 2 ran again


@pytest.mark.slow
def test_two_processes_write_the_stats_of_one_and_resume_like_it(tmp_path, monkeypatch):
    tiny_wan_pipeline(seed=0, two_transformers=True).save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, calibrate_args(tmp_path / "pipe", tmp_path / "prompts.txt", tmp_path / "one"))
        assert result.exit_code == 0, result.output
        one = tmp_path / "one" / "stats.safetensors"
        assert_same_stats(tmp_path / "two" / "stats.safetensors", one)
        assert_same_stats(tmp_path / "killed" / "stats.safetensors", one)
        assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
            p.name for p in (tmp_path / "one").iterdir()
        )
        for name in ("calibration.json", "nabla_config.json", "report.md"):
            assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

        # the partial stats of the killed 2-process run, resumed by one process
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        write_marker(resumed, "calibrate")
        (resumed / "stats.safetensors").write_bytes((tmp_path / "partial.safetensors").read_bytes())
        calls = StopAtExchange(monkeypatch)
        result = CliRunner().invoke(main, calibrate_args(tmp_path / "pipe", tmp_path / "prompts.txt", resumed))
        assert result.exit_code == 0, result.output
        assert calls.calls == EXCHANGES_PER_ROUND
        assert_same_stats(resumed / "stats.safetensors", one)
    finally:
        torch.set_num_threads(threads)


def test_several_processes_take_their_own_gpus_and_search_in_one(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match="each process takes its own GPU"):
        Processes.launched("cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            Processes.launched("cuda")
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"")
    result = CliRunner().invoke(main, ["calibrate", "--from-stats", str(stats), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "run it as one process" in result.output


def test_samples_are_dealt_in_rounds_with_process_0_first():
    assert Processes(0, 2).rounds([1, 2, 4]) == [[1, 2], [4]]
    assert [Processes(i, 2).pick([4]) for i in range(2)] == [4, None]
    assert Processes().rounds([0, 1]) == [[0], [1]]
