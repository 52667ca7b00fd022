"""The heat-map replay of a half-precision run (backend/analysis/examples.py): GPU kernels differ by batch size, so a
replay of the example generations in other batches than the capture's does not reproduce the recorded values to
float32 precision. Simulated on CPU with a denoiser whose output depends on its batch size (by several ulps of
bfloat16, as rounding differences grow over many denoising steps): the replay runs the capture's own batches (same
composition) and passes, and a replay whose values are off by more than the tolerance still fails. Deterministic
kernels are switched on for CUDA generations only."""

import shutil

import pytest
import torch
from capture_runs import interrupt_replay_at_second_batch, make_cfg

from backend.analysis import examples
from backend.errors import DifflensError
from backend.models.base import DiffusionModel, deterministic_kernels
from backend.run.config import AnalysisConfig
from backend.run.prompts import DEMO_PROMPTS

BF16_EPS = torch.finfo(torch.bfloat16).eps


def batch_dependent(predict):
    """predict_noise whose result depends on the batch's size, as GPU kernels do (here by 8 to 48 ulps of bfloat16
    on the input: more than the replay's tolerance of 4)."""

    def predict_noise(self, x, t, cond):
        return predict(self, x * (1 + 8 * BF16_EPS * (x.shape[0] % 7)), t, cond)

    return predict_noise


def capture_bf16(tmp_path_factory, batch_dependent_kernels: bool):
    """A demo run captured in bfloat16 in batches of 4 generations (8 with CFG)."""
    from backend.stages.capture import capture

    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::60]) + "\n")  # 6 prompts
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), images_per_prompt=2, steps=3, batch_size=4,
                   layers=["mid_block.attentions.0"])
    cfg.dtype = "bfloat16"
    with pytest.MonkeyPatch.context() as mp:
        if batch_dependent_kernels:
            mp.setattr(DiffusionModel, "predict_noise", batch_dependent(DiffusionModel.predict_noise))
        capture(cfg, progress=False)
    return cfg.out_dir


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, one_thread):
    """Captured on the batch-dependent model."""
    return capture_bf16(tmp_path_factory, batch_dependent_kernels=True)


@pytest.fixture
def run(bf16_run, tmp_path, monkeypatch):
    """A fresh copy of the run, and the batch-dependent model for the replay."""
    copy = tmp_path / "run"
    shutil.copytree(bf16_run, copy)
    monkeypatch.setattr(DiffusionModel, "predict_noise", batch_dependent(DiffusionModel.predict_noise))
    return copy


SMALL = dict(examples_top_n=2, replay_batch_size=3)  # the replay's own batch size differs from the capture's 4


def test_a_bfloat16_replay_reproduces_the_capture(run):
    from backend.stages.analysis import analyze

    summary = analyze(run, AnalysisConfig(**SMALL), progress=False)
    assert summary["examples"]["batches"] == 3  # the capture's three batches of 4, not batches of 3
    import polars as pl

    ex = pl.read_parquet(f"{run}/tables/examples/**/*.parquet", hive_partitioning=True)
    assert ex.height > 0 and ex["heatmap"].null_count() == 0


def test_replaying_other_batches_than_the_capture_fails_the_check(run):
    """What the replay did before: only the example generations, 3 per batch. The kernels see other batch sizes,
    the values move by more than float32 noise, and the check catches it."""
    from backend.stages.analysis import analyze

    with pytest.raises(DifflensError, match="did not reproduce its recorded"):
        analyze(run, AnalysisConfig(**SMALL, replay_batches="requested", replay_tolerance=1e-3), progress=False)


def test_a_replay_off_by_more_than_the_tolerance_still_fails(run, monkeypatch):
    from backend.stages.analysis import analyze

    tolerance = examples.replay_tolerance(AnalysisConfig(**SMALL), "bfloat16", torch.bfloat16)
    assert tolerance == 4 * BF16_EPS  # a few units in the last place of the run's dtype
    real = examples._Keeper.__call__

    def perturbed(self, ev):
        ev.tokens = ev.tokens * (1 + 3 * tolerance)
        real(self, ev)

    monkeypatch.setattr(examples._Keeper, "__call__", perturbed)
    with pytest.raises(DifflensError, match="did not reproduce its recorded"):
        analyze(run, AnalysisConfig(**SMALL), progress=False)


def test_replay_tolerance_is_a_few_ulps_of_the_coarsest_dtype():
    cfg = AnalysisConfig(replay_tolerance=1e-3)
    assert examples.replay_tolerance(cfg, "float32", torch.float32) == 1e-3
    assert examples.replay_tolerance(cfg, "float16", torch.float16) == 4 * torch.finfo(torch.float16).eps
    assert examples.replay_tolerance(cfg, "float32", torch.bfloat16) == 4 * BF16_EPS  # replayed in another dtype
    assert examples.replay_tolerance(AnalysisConfig(replay_tolerance=0.1), "bfloat16", torch.bfloat16) == 0.1


def test_replay_batches_auto_follows_the_dtype_and_device():
    auto = AnalysisConfig()
    assert examples.replay_by_capture_batches(auto, "float32", torch.device("cpu")) is False
    assert examples.replay_by_capture_batches(auto, "bfloat16", torch.device("cpu")) is True
    assert examples.replay_by_capture_batches(auto, "float32", torch.device("cuda", 0)) is True
    assert examples.replay_by_capture_batches(AnalysisConfig(replay_batches="capture"), "float32", "cpu") is True


def test_deterministic_kernels_on_cuda_only_and_restored():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_kernels(torch.device("cpu")):
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before[:2]
    with deterministic_kernels(torch.device("cuda", 0)):  # flags only: no CUDA is needed to set them
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before


def test_an_interrupted_replay_resumed_with_other_batches_starts_the_replay_again(tmp_path_factory, monkeypatch,
                                                                                  one_thread):
    """Replay markers are named by their batch's first generation, and batches of another plan (another
    replay_batch_size, or the capture's batches instead of the requested ones: "auto" on another device) cover other
    generations; those settings are outside the analysis stage key, so a resume under another plan must replay from
    scratch rather than skip generations a marker of the old plan seems to cover."""
    from backend.stages.analysis import analyze

    run = capture_bf16(tmp_path_factory, batch_dependent_kernels=False)
    undo = interrupt_replay_at_second_batch(monkeypatch)
    first = dict(SMALL, replay_batches="requested", replay_batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        analyze(run, AnalysisConfig(**first), progress=False)
    undo()
    summary = analyze(run, AnalysisConfig(**{**first, "replay_batch_size": 5}), progress=False)
    import polars as pl

    ex = pl.read_parquet(f"{run}/tables/examples/**/*.parquet", hive_partitioning=True)
    assert ex.height > 0 and ex["heatmap"].null_count() == 0
    assert summary["examples"]["batches"] == -(-summary["examples"]["generations_replayed"] // 5)  # every batch
