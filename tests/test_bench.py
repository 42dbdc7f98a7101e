"""`python -m seglight bench` on tiny models: the rounds run interleaved and give sensible numbers,
peers are built fairly (same encoder, no download) or reported missing, the memory meter sees
what a round allocates, and the data part measures both loader paths."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import pytest
import torch

from seglight.cli import run as cli_run
from seglight.commands.bench import run
from seglight.commands.bench.command import parse_args
from seglight.commands.bench.data import bench_data, bench_loader
from seglight.commands.bench.measure import MemoryMeter, median_ci
from seglight.commands.bench.peers import Runner, build_peers, random_batches
from seglight.commands.bench.training import bench_training
from seglight.data import CamVid
from seglight.errors import ConfigError
from seglight.models import MODELS

TINY = ["--model", "UNet", "--model.encoder", "original", "--model.base_channels", "4"]
FAST = [
    "--size",
    "32",
    "32",
    "--batch-size",
    "2",
    "--rounds",
    "2",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared, busy CPU two threads wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_runner() -> Runner:
    return Runner(torch.device("cpu"), "32", channels_last=True, total_steps=10)


def test_bench_runs_seglight_and_the_raw_loop_interleaved(tmp_path, capsys):
    out = tmp_path / "bench.json"
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.setLevel(logging.INFO)
    filters = list(warnings.filters)
    results = run([*TINY, *FAST, "--peers", "raw", "--json", str(out)])
    # quiet during the bench only: the process's logging and warning filters are as before
    assert lightning_log.level == logging.INFO and warnings.filters == filters
    assert json.loads(out.read_text())["setup"]["model"] == "UNet"
    for kind in ("train", "infer"):
        rows = results[kind]
        assert [r["peer"] for r in rows] == ["seglight UNet", "raw loop (UNet)"]
        assert rows[0]["params"] == rows[1]["params"] > 0  # the same network
        assert rows[0]["speed_ratio"] == 1.0
        for row in rows:
            assert row["images_per_s"] > 0 and row["min"] <= row["images_per_s"] <= row["max"]
            # the median of the per-round ratios, inside its confidence interval
            ratios = [a / b for a, b in zip(rows[0]["rates"], row["rates"], strict=True)]
            low, high = row["speed_ratio_ci"]
            assert min(ratios) <= low <= row["speed_ratio"] <= high <= max(ratios)
            if sys.platform == "linux":  # parameters + Adam state at the least
                assert row["peak_mb"] > 0
            # CPU inference memory is the allocator's cache: no ratio; training memory has one
            assert (row["memory_ratio"] is None) == (kind == "infer" or sys.platform != "linux")
    printed = capsys.readouterr().out
    assert "training: seglight in Trainer.fit" in printed and "raw loop (UNet)" in printed


def test_the_batch_size_is_spelled_as_for_fit():
    from seglight.commands.bench import parse_args

    args, overrides = parse_args([*TINY, "--data.batch_size", "8"])
    assert args.batch_size == 8 and overrides["data"]["batch_size"] == 8
    assert parse_args([*TINY, "--batch-size", "4"])[0].batch_size == 4  # the older spelling
    assert parse_args(TINY)[0].batch_size == 2


def test_interleaving_alternates_rounds_and_memory_is_measured_apart(monkeypatch):
    """Each peer's round runs between two of seglight's: the callback calls the peers at round
    boundaries inside Trainer.fit. The memory meter runs only in one extra pass after the timed
    rounds (its allocator settings would slow the timed steps)."""
    runner = cpu_runner()
    model, peers, _ = build_peers(
        runner, MODELS["UNet"], {"encoder": "original", "base_channels": 4}, 3, 3, {"raw"}, False
    )
    order: list[str] = []
    peer = peers[0]
    step = peer.step
    peer.step = lambda batch: (order.append("raw"), step(batch))[1]
    forward = model.training_step
    model.training_step = lambda *a, **k: (order.append("seglight"), forward(*a, **k))[1]
    start, stop = MemoryMeter.start, MemoryMeter.stop
    monkeypatch.setattr(MemoryMeter, "start", lambda self: (order.append("m+"), start(self))[1])
    monkeypatch.setattr(MemoryMeter, "stop", lambda self: (order.append("m-"), stop(self))[1])
    batches = random_batches(2, 2, 3, [32, 32], 3, runner)
    seglight = bench_training(model, peers, batches, runner, rounds=3, steps=2, warmup=1).train
    assert len(seglight.seconds) == len(peer.train.seconds) == 3
    # the peer's warm-up, then seglight's (1 step each), 3 rounds x 2 steps, then the memory
    # pass of each (2 steps), then 1 closing step for seglight
    assert order == (
        ["raw", "seglight", "raw", "raw"]
        + (["seglight"] * 2 + ["raw"] * 2) * 2
        + ["seglight"] * 2
        + ["m+", "raw", "raw", "m-", "m+"]
        + ["seglight"] * 2
        + ["m-", "seglight"]
    )
    if sys.platform == "linux":
        assert len(seglight.peak) == len(peer.train.peak) == 1


def test_profile_shows_where_each_peers_step_goes(capsys):
    """`--profile`: one profiled pass of each peer after the timed rounds; operators side by
    side, seglight's Lightning hooks and the raw loop's phases named."""
    results = run([*TINY, *FAST, "--peers", "raw", "--skip", "infer", "--no-memory", "--profile"])
    profiles = results["profile"]
    assert list(profiles) == ["seglight UNet", "raw loop (UNet)"]
    for profile in profiles.values():
        assert profile["step_ms"] > 0 and profile["ops"]
        assert any(r["name"] == "aten::convolution_backward" for r in profile["ops"])
    seglight = {r["name"] for r in profiles["seglight UNet"]["phases"]}
    assert "[LightningModule]UNet.optimizer_step" in seglight and "run_training_batch" in seglight
    raw = {r["name"] for r in profiles["raw loop (UNet)"]["phases"]}
    assert {"zero_grad", "forward + loss", "backward", "optimizer.step"} <= raw
    # the timed rounds are as many as without a profile
    assert len(results["train"][0]["rates"]) == 2
    printed = capsys.readouterr().out
    assert "where each peer's training step goes" in printed and "seglight - raw loop" in printed


def test_precisions_are_compared_on_the_raw_loop(capsys):
    """`--precision 32,bf16-mixed`: seglight at the first, the raw loop at each, and a table of
    each variant's speed against the first; the CPU's bf16 support is named."""
    results = run([*TINY, *FAST, "--peers", "raw", "--skip", "infer", "--no-memory",
                   "--precision", "32,bf16-mixed"])  # fmt: skip
    assert [r["peer"] for r in results["train"]] == [
        "seglight UNet", "raw loop (UNet, 32)", "raw loop (UNet, bf16-mixed)"]  # fmt: skip
    rows = results["variants"]["train"]
    assert [r["peer"] for r in rows] == ["raw loop (UNet, 32)", "raw loop (UNet, bf16-mixed)"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert any(n.startswith("bf16-mixed: this CPU has") for n in results["notes"])
    assert "precision and torch.compile" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [(["--precision", "32,64"], "--precision: expected one or more of"),
     (["--compile", "maybe"], "--compile: expected one or more of false, true")],
)  # fmt: skip
def test_variant_options_are_checked(args, message):
    with pytest.raises(ConfigError, match=message):
        run([*TINY, *FAST, *args])


def test_native_bf16_is_detected_from_the_cpu_flags(tmp_path, monkeypatch):
    from seglight.hardware import native_bf16

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert native_bf16(cpuinfo) == "AVX512_BF16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert native_bf16(cpuinfo) is None
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")  # Arm
    assert native_bf16(cpuinfo) == "Arm BF16"
    assert native_bf16(tmp_path / "missing") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16(cpuinfo) == "AMX-BF16"  # torch's own probe first


def test_median_ci_uses_order_statistics():
    values = [1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0, 10.0]
    # n = 10: P(Bin(10, 1/2) <= 1) = 0.011 but P(<= 2) = 0.055, so the 2nd and 9th values
    assert median_ci(values) == (2.0, 9.0)
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95%: min-max


def test_loss_bench_times_each_loss_and_size(capsys):
    results = run(["--losses", "ce,dice,ohem", "--loss-sizes", "16,32", "--rounds", "2",
                   "--steps", "1", "--warmup", "0", "--threads", "1"])  # fmt: skip
    rows = results["losses"]
    assert [(r["loss"], r["size"]) for r in rows] == [
        (n, s) for n in ("ce", "dice", "ohem") for s in (16, 32)
    ]
    assert all(0 < r["min"] <= r["ms"] <= r["max"] for r in rows)
    assert "ms / Mpixel" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--losses: unknown"):
        run(["--losses", "nope"])


def test_deeplabv3plus_is_paired_with_smp_only_when_separable():
    pytest.importorskip("segmentation_models_pytorch")
    for separable in (False, True):
        model, peers, notes = build_peers(
            cpu_runner(), MODELS["DeepLabV3Plus"], {"encoder": "resnet18", "separable": separable},
            11, 3, {"smp"}, False,
        )  # fmt: skip
        ours = sum(p.numel() for p in model.net.parameters())
        theirs = peers[0].params
        if separable:  # the same network up to seglight's second separable conv (0.03%)
            assert notes == [] and abs(ours - theirs) / theirs < 0.001
        else:
            assert "NOT the same network" in notes[0] and ours > 1.05 * theirs


def test_missing_smp_is_reported_and_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # import fails
    _, peers, notes = build_peers(
        cpu_runner(), MODELS["UNet"], {"encoder": "resnet18"}, 3, 3, {"raw", "smp"}, False
    )
    assert [p.name for p in peers] == ["raw loop (UNet)"]
    assert notes == [
        "smp peer skipped: segmentation-models-pytorch is not installed "
        "(pip install segmentation-models-pytorch, or seglight[bench])"
    ]
    run([*TINY, *FAST, "--skip", "train", "--peers", "smp"])
    assert "has no smp equivalent" in capsys.readouterr().out  # the original U-Net: no smp twin


def test_smp_peers_use_the_same_encoder():
    pytest.importorskip("segmentation_models_pytorch")
    for name, options in (
        ("UNet", {"encoder": "resnet18"}),
        ("DeepLabV3Plus", {"encoder": "resnet18"}),
    ):
        model, peers, notes = build_peers(
            cpu_runner(), MODELS[name], options, 11, 3, {"smp"}, False
        )
        assert len(peers) == 1 and all("skipped" not in n for n in notes)
        ours, theirs = model.net, peers[0].module
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(theirs.encoder) == count(ours.encoder)
        assert peers[0].name.endswith("(tu-resnet18)")
        with torch.no_grad():
            assert theirs.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 11, 64, 64)
    # UNet: identical decoder; the heads differ (smp: 3x3, ours: 1x1), by 1,408 parameters
    unet, peers, _ = build_peers(
        cpu_runner(), MODELS["UNet"], {"encoder": "resnet34"}, 11, 3, {"smp"}, False
    )
    assert sum(p.numel() for p in peers[0].module.parameters()) - sum(
        p.numel() for p in unet.net.parameters()
    ) == 16 * 11 * (9 - 1)


def test_torchvision_peers_build_without_downloading(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a peer tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    _, peers, _ = build_peers(
        cpu_runner(), MODELS["DeepLabV3"], {"encoder": "resnet18"}, 11, 3, {"torchvision"}, False
    )
    names = {p.name: p.params for p in peers}
    assert set(names) == {"torchvision deeplabv3_resnet50", "torchvision fcn_resnet50"}
    assert 39e6 < names["torchvision deeplabv3_resnet50"] < 40e6  # 39.6M for 11 classes
    assert 32e6 < names["torchvision fcn_resnet50"] < 33e6


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU meter reads /proc/self")
def test_memory_meter_sees_each_rounds_allocation():
    meter = MemoryMeter(torch.device("cpu"))
    assert meter.available
    sizes = []
    for mb in (200, 50, 200):
        meter.start()
        block = torch.ones(mb * 2**18)  # mb MB of float32, touched
        del block
        sizes.append(meter.stop() / 2**20)
    # each round sees its own peak, although the first one's memory was freed before the next
    assert sizes[0] == pytest.approx(200, abs=20)
    assert sizes[1] == pytest.approx(50, abs=20)
    assert sizes[2] == pytest.approx(200, abs=20)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator settings")
def test_memory_meter_changes_the_allocator_only_between_start_and_stop(monkeypatch):
    """The meter's allocator settings (a small mmap threshold) slow every step: building the
    meter before the timed rounds must not apply them; stop() puts back the rounds' settings."""
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim",))

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    meter = MemoryMeter(torch.device("cpu"))
    assert meter.available and calls == []
    meter.start()
    assert calls == [("mallopt", -3, 256 * 1024), ("trim",)]
    meter.stop()
    assert calls[2:] == [("mallopt", -3, 2**30), ("mallopt", -1, 2**30)]  # keep_freed_memory


def test_data_bench_measures_both_paths(fake_camvid):
    dm = CamVid(root=str(fake_camvid), batch_size=2, num_workers=0, crop_size=(16, 16))
    rows = bench_data(dm, torch.device("cpu"), rounds=2)
    assert [r["path"] for r in rows] == ["DataLoader (0 workers)", "resident (cpu)"]
    for row in rows:
        assert row["images"] == [6, 6]  # an epoch: 6 training images in batches of 2
        assert row["images_per_s"] > 0
    assert rows[1]["setup_s"] > 0


def test_bench_is_a_cli_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_run(["bench", "--help"])
    assert exit_.value.code == 0
    assert "--model.OPTION VALUE" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "UNet", "--oops", "1"], "unknown argument '--oops'"),
        (["--model", "NoSuchNet"], "unknown 'NoSuchNet'"),
        ([], "give --model NAME"),
        ([*TINY, "--precision", "16-mixed", "--device", "cpu"], "16-mixed needs a CUDA GPU"),
        ([*TINY, "--peers", "raw,timm"], "--peers: unknown"),
        (["--config", "/no/such.yaml"], "no such file"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        run(args)


def test_model_and_data_options_from_a_config_and_the_command_line(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(
        "model:\n  class_path: UNet\n  init_args:\n    encoder: resnet18\n"
        "data:\n  class_path: CamVid\n  init_args:\n    batch_size: 8\n"
    )
    args, overrides = parse_args(
        ["--config", str(config), "--model.base_channels=8", "--data.crop_size", "[64, 64]"]
    )
    assert args.config == str(config)
    assert overrides == {"model": {"base_channels": 8}, "data": {"crop_size": [64, 64]}}


def test_loader_bench_pairs_transforms_sample_by_sample(fake_camvid, capsys):
    dm = CamVid(root=str(fake_camvid), batch_size=2, num_workers=0, crop_size=(16, 16))
    dm.setup("fit")
    calls = []

    def traced(name):
        def transform(image, mask):
            calls.append((name, torch.rand(()).item()))  # the draw each transform gets
            return dm.train_transform()(image, mask)

        return transform

    results = bench_loader(dm, [0], {"a": traced("a"), "b": traced("b")}, samples=4, batches=3)
    # the same seed per sample: both transforms see the same draws, in turn
    # then 3 rounds of each transform's loader (3 batches of 2)
    assert [c[0] for c in calls] == ["a", "b"] * 4 + (["a"] * 6 + ["b"] * 6) * 3
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, 8, 2))
    assert len({c[1] for c in calls[:8]}) == 4
    steps = [(r["step"], r["subset"], r["n"]) for r in results["costs"]]
    assert steps == [("load: decode image + mask, check", "all", 4),
                     ("  of which image decode", "all", 4), ("a", "all", 4), ("b", "all", 4)]  # fmt: skip
    assert all(r["ms"] > 0 for r in results["costs"])
    # b's time over a's, sample by sample (the same work: near 1), only on b's row
    assert [r["ratio"] is None for r in results["costs"]] == [True, True, True, False]
    assert 0.2 < results["costs"][3]["ratio"] < 5
    assert [(r["transform"], r["workers"], r["rounds"]) for r in results["rates"]] == [
        ("a", 0, 3), ("b", 0, 3)]  # fmt: skip
    assert all(r["images_per_s"] > 0 for r in results["rates"])
    assert results["rates"][0]["ratio"] is None and results["rates"][1]["ratio"] > 0


def test_loader_bench_is_a_bench_mode(fake_camvid, capsys):
    results = run(["--loader", "0", "--data", "CamVid", "--data.root", str(fake_camvid),
                   "--data.crop_size", "[16, 16]", "--data.batch_size", "2", "--loader-samples",
                   "6", "--data-rounds", "1", "--data-batches", "3", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "per sample: CamVid train, crop 16x16" in out and "images/s" in out
    subsets = {r["subset"] for r in results["costs"] if r["step"] == "TrainTransform"}
    assert subsets <= {"all", "s < 1", "s >= 1"} and len(subsets) >= 2  # split by the scale
    with pytest.raises(ConfigError, match="--loader: expected worker counts"):
        run(["--loader", "two", "--data", "CamVid"])
    with pytest.raises(ConfigError, match="give --data NAME"):
        run(["--loader", "0"])


def test_bench_command_prints_no_known_noise(tmp_path):
    """`python -m seglight bench` builds Trainers: Lightning's litlogger tip is silenced as in fit."""
    from conftest import run_cli

    proc = run_cli(["bench", *TINY, *FAST, "--peers", "raw", "--skip", "infer"], cwd=tmp_path)
    shown = proc.stdout + proc.stderr
    assert "raw loop (UNet)" in shown and "litlogger" not in shown
