"""The GPU path: precision, memory format and compilation resolved once; the airbench net; the
synthetic data set; each trial's memory estimate and the packing of trials per GPU.

What runs on a CPU is tested here on the CPU (bf16 autocast, channels-last, the resident-data path);
what needs CUDA is marked `gpu` and skipped without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import traceback
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flatbasin.search import preflight
from flatbasin.search.errors import UsageError
from flatbasin.spaces import load_space
from flatbasin.trainables import accel
from flatbasin.trainables.averagers import EMA
from flatbasin.trainables.checkpoint import _differences
from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.footprint import estimate, footprint, probe
from flatbasin.trainables.loop import load_deployed, train
from flatbasin.trainables.models import AirbenchNet, build_model
from flatbasin.trainables.sanity import TrialError, check_trial
from flatbasin.trainables.variants import REGISTRY

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def config(variant: str = "sgd", **settings):
    """A two-epoch trial, as the contract test's (the variant's smoke parameters)."""
    smoke = REGISTRY[variant].smoke
    return make_config(variant, {**smoke, "epochs": 2, "batch_size": 32, "threads": 1, **settings})


# ---- runtime resolution


def test_cpu_defaults_are_fp32_contiguous_eager_and_the_old_eval_batch():
    run = accel.resolve(CPU, (1, 8, 8))
    assert (run.autocast_dtype, run.channels_last, run.compile) == (None, False, False)
    assert run.eval_batch_size == 1024
    assert run.record() == {
        "device": "cpu", "precision": "fp32", "channels_last": False, "compile": False,
        "eval_batch_size": 1024,
    }  # fmt: skip


def test_asked_for_bf16_and_channels_last_the_cpu_gives_them():
    run = accel.resolve(CPU, (3, 32, 32), precision="bf16", channels_last=True)
    assert (run.precision, run.memory_format) == ("bf16", torch.channels_last)
    model = build_model("small_cnn", (3, 32, 32), 10)
    with run.autocast():
        assert model(torch.randn(4, 3, 32, 32)).dtype == torch.bfloat16
    assert run.batch(torch.randn(4, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)


def test_auto_precision_follows_the_device_and_bf16_without_support_is_refused():
    cuda = torch.device("cuda")
    assert accel.autocast_dtype("auto", cuda, bf16_ok=True) == torch.bfloat16
    assert accel.autocast_dtype("auto", cuda, bf16_ok=False) is None  # pre-Ampere: fp32
    assert accel.autocast_dtype("auto", CPU, bf16_ok=True) is None
    assert accel.autocast_dtype("fp32", cuda, bf16_ok=True) is None
    with pytest.raises(ValueError, match=r"compute capability 8\.0"):
        accel.autocast_dtype("bf16", cuda, bf16_ok=False)


def test_channels_last_on_1d_signals_is_refused_by_name():
    data = load_data(DataSpec(dataset="mnist1d"), "cpu")
    with pytest.raises(TrialError, match="channels_last applies to images"):
        check_trial(config(dataset="mnist1d", channels_last=True), data)
    check_trial(config(dataset="mnist1d", channels_last="auto"), data)  # auto: off for signals


def test_a_checkpoint_from_before_the_options_resumes_and_layout_may_change():
    old = config().model_dump(mode="json")
    for key in ("precision", "channels_last", "compile"):
        del old[key]
    assert _differences(old, config().model_dump(mode="json")) == []
    assert _differences(old, config(channels_last=True, compile=True).model_dump(mode="json")) == []
    assert _differences(old, config(precision="bf16").model_dump(mode="json")) == [
        "precision (checkpoint 'auto', now 'bf16')"
    ]


# ---- training on the CPU with the GPU path's options


def test_bf16_autocast_trains_on_the_cpu_and_the_average_stays_fp32(small, tmp_path):
    bf16 = config("swa", precision="bf16")
    checkpoint = tmp_path / "bf16.pt"

    def keep_last(metrics, save):
        save(checkpoint)

    result = train(bf16, data=small, on_epoch=keep_last)
    fp32 = train(config("swa"), data=small)
    assert result.runtime["precision"] == "bf16" and fp32.runtime["precision"] == "fp32"
    assert not result.diverged and result.score > 0.3
    # autocast really ran: the same trial in fp32 computes other numbers
    assert [m.train_loss for m in result.history] != [m.train_loss for m in fp32.history]
    deployed = load_deployed(bf16, checkpoint, small)
    assert isinstance(deployed, AveragedModel) and int(deployed.n_averaged) >= 1
    assert {p.dtype for p in deployed.parameters()} == {torch.float32}


def test_channels_last_predicts_as_contiguous_does_and_trains(small):
    torch.manual_seed(0)
    model = build_model("small_cnn", small.shape, small.num_classes).eval()
    nhwc = build_model("small_cnn", small.shape, small.num_classes).eval()
    nhwc.load_state_dict(model.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    x = small.x_val[:64]
    with torch.no_grad():
        expected = model(x)
        got = nhwc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    result = train(config("ema", channels_last=True, decay=0.8), data=small)
    assert result.runtime["channels_last"] is True
    assert not result.diverged and result.score > 0.3


def test_the_defaults_on_the_cpu_reproduce_bit_for_bit(small):
    """Every GPU option at its default is the computation flatbasin did before they existed: two
    runs agree exactly, and agree with the same run asking for fp32 and contiguous by name."""
    a = train(config("ema", augment=True, decay=0.8), data=small)
    b = train(
        config("ema", augment=True, decay=0.8, precision="fp32", channels_last=False), data=small
    )
    assert a.history == b.history and a.score == b.score and a.test_acc == b.test_acc


def test_synthetic_data_is_resident_and_the_airbench_net_trains_on_it():
    spec = DataSpec(dataset="synthetic", synthetic_images=240, test_frac=1 / 6)
    data = load_data(spec, "cpu")
    assert data.shape == (3, 32, 32) and data.num_classes == 10
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (180, 20, 40)
    assert load_data(spec, "cpu").fingerprint == data.fingerprint  # the same draw every time
    assert (
        load_data(spec.model_copy(update={"data_seed": 7}), "cpu").fingerprint != data.fingerprint
    )
    # The resident path: batches are slices of the device's tensors, augmented there as a whole.
    for x, y in itertools.islice(data.train_batches(32, torch.Generator().manual_seed(0), True), 2):
        assert (x.device, y.device, x.shape) == (
            data.x_train.device,
            data.y_train.device,
            (32, 3, 32, 32),
        )
    result = train(
        make_config("sgd", {"dataset": "synthetic", "synthetic_images": 240, "test_frac": 1 / 6,
                            "model": "airbench", "epochs": 1, "batch_size": 32, "threads": 1,
                            "augment": True, "lr": 0.02}),
        data=data,
    )  # fmt: skip
    assert result.model == "airbench" and not result.diverged
    assert all(math.isfinite(m.train_loss) for m in result.history)


def test_synthetic_only_settings_are_refused_elsewhere():
    with pytest.raises(ValueError, match="synthetic"):
        DataSpec(dataset="digits", synthetic_images=100)
    with pytest.raises(ValueError, match="built in"):
        DataSpec(dataset="synthetic", data_dir=Path("/data"))


def test_airbench_net_shapes_and_size():
    model = build_model("airbench", (3, 32, 32), 10)
    assert isinstance(model, AirbenchNet)
    assert 1.9e6 < sum(p.numel() for p in model.parameters()) < 2.1e6  # airbench94's ~2M
    out = model(torch.randn(8, 3, 32, 32))
    assert out.shape == (8, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert build_model("airbench", (1, 32, 32), 100)(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="32x32"):
        build_model("airbench", (1, 8, 8), 10)


def test_ema_step_matches_averaged_model_bit_for_bit(small):
    """EMA's update skips AveragedModel's per-step counter copy (a host sync on a GPU), not its math."""
    torch.manual_seed(0)
    model = build_model("small_cnn", small.shape, small.num_classes)
    ours = EMA(model, decay=0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        model(small.x_train[step * 16 : (step + 1) * 16]).sum().backward()
        optimizer.step()
        ours.update(model, step)
        reference.update_parameters(model)
    assert ours.average.n_averaged.device == CPU  # counted on the host: read without a sync
    for a, b in zip(
        ours.average.state_dict().values(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


# ---- the memory estimate


@pytest.fixture(scope="module")
def images() -> Data:
    return load_data(DataSpec(dataset="synthetic", synthetic_images=200), "cpu")


def image_config(variant: str = "sgd", **settings):
    return make_config(
        variant, {"dataset": "synthetic", "synthetic_images": 200, "model": "airbench", "epochs": 4,
                  "batch_size": 32, **settings},
    )  # fmt: skip


def test_footprint_grows_with_the_batch_and_counts_the_resident_data(images):
    probed = probe(image_config(), images, None)
    sizes = [footprint(image_config(batch_size=b), probed, images, 2048) for b in (16, 32, 48, 64)]
    batches = [f.training_batch for f in sizes]
    assert batches == sorted(batches) and len(set(batches)) == 4
    # linear in the batch size: equal steps of batch size, equal steps of bytes
    assert batches[2] - batches[1] == pytest.approx(batches[1] - batches[0], rel=0.02)
    assert sizes[0].data == sum(
        t.numel() * t.element_size()
        for t in (
            images.x_train,
            images.y_train,
            images.x_val,
            images.y_val,
            images.x_test,
            images.y_test,
        )
    )
    bigger = dataclasses.replace(images, x_train=torch.cat([images.x_train] * 3))
    assert footprint(image_config(), probed, bigger, 2048).total > sizes[1].total


def test_footprint_counts_optimizer_state_averages_and_precision(images):
    sgd = estimate(image_config(), images, autocast_dtype=None, eval_batch_size=2048)
    params = sum(p.numel() * 4 for p in build_model("airbench", (3, 32, 32), 10).parameters())
    assert sgd.gradients == params and sgd.optimizer == params  # one momentum buffer
    assert (
        estimate(
            image_config(momentum=0.0), images, autocast_dtype=None, eval_batch_size=2048
        ).optimizer
        == 0
    )
    adam = estimate(
        image_config(optimizer="adam"), images, autocast_dtype=None, eval_batch_size=2048
    )
    assert adam.optimizer >= 2 * params
    assert sgd.averages == 0
    swa = estimate(image_config("swa"), images, autocast_dtype=None, eval_batch_size=2048)
    assert swa.averages == sgd.weights  # one AveragedModel
    snapshot = estimate(
        image_config("snapshot", cycles=4), images, autocast_dtype=None, eval_batch_size=2048
    )
    assert snapshot.averages == (1 + 4 + 1) * sgd.weights  # template, 4 members, their average
    members_only = estimate(
        image_config("snapshot", cycles=4, weight_average_curve=False),
        images, autocast_dtype=None, eval_batch_size=2048,
    )  # fmt: skip
    assert members_only.averages == (1 + 4) * sgd.weights
    bf16 = estimate(image_config(), images, autocast_dtype=torch.bfloat16, eval_batch_size=2048)
    assert bf16.training_batch < sgd.training_batch  # activations kept in bf16
    # evaluation batches: as large as asked, but never larger than the largest split scored
    largest = max(len(images.x_val), len(images.x_test))
    evaluated = {
        b: estimate(image_config(), images, autocast_dtype=None, eval_batch_size=b).evaluation_batch
        for b in (largest // 2, largest, 2048)
    }
    assert (
        evaluated[largest // 2] * 2 == evaluated[largest] == evaluated[2048] == sgd.evaluation_batch
    )


# ---- packing trials on a GPU


@pytest.mark.parametrize("share", [0.0, 1.0, 2.0, 0.5, 0.25, 0.2, 0.125, 1 / 3, 0.3333, 0.333])
def test_shares_that_pack_whole_trials_pass(share):
    assert preflight.check_gpu_share(share) == share


@pytest.mark.parametrize(
    "share, needle",
    [(0.3, "leave 10% of it unused"), (0.3334, "fit 2 trial"), (0.45, "fit 2 trial"),
     (1.5, "not a whole number"), (0.00001, "smallest share")],
)  # fmt: skip
def test_shares_that_waste_a_gpu_are_refused(share, needle):
    with pytest.raises(ValueError, match=needle):
        preflight.check_gpu_share(share)


def test_trials_per_gpu_is_the_share_capped_by_concurrency():
    assert preflight.trials_per_gpu(0.25, 8) == 4
    assert preflight.trials_per_gpu(0.25, 2) == 2
    assert preflight.trials_per_gpu(1 / 3, 8) == 3
    assert preflight.trials_per_gpu(2.0, 8) == 1


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "packing.yaml"
    path.write_text(
        "epochs: 4\ndataset: synthetic\nmodel: airbench\nfixed: {synthetic_images: 200}\nvariants:\n"
        "  sgd: {lr: {loguniform: [0.01, 0.1]}, batch_size: {choice: [32, 64]}}\n"
        "  snapshot: {cycles: {int: [2, 4]}, batch_size: 64}\n"
    )
    return load_space(path)


def test_a_packing_that_cannot_fit_is_refused_naming_the_worst_trial(space):
    worst = max(
        estimate(
            c, load_data(c.data_spec, "cpu"), autocast_dtype=torch.bfloat16, eval_batch_size=2048
        ).total
        for c in space.corner_configs()
    )
    gpu = preflight.Gpu("Test GPU 8 GB", total_bytes=int(3.5 * worst), bf16=True)
    preflight.check_gpu_packing(space, 1.0, 8, gpu)  # one per GPU fits
    preflight.check_gpu_packing(space, 1 / 3, 8, gpu)  # three fit
    preflight.check_gpu_packing(space, 0.25, 3, gpu)  # four asked, but only three run at once
    with pytest.raises(UsageError) as refused:
        preflight.check_gpu_packing(space, 0.25, 8, gpu)
    message = str(refused.value)
    for needle in ("--gpus-per-trial 0.25", "4 trial(s) on one GPU", "a snapshot trial",
                   "batch_size 64", "Test GPU 8 GB", "--gpus-per-trial 0.3333: 3 per GPU"):  # fmt: skip
        assert needle in message
    tiny = preflight.Gpu("Tiny", total_bytes=worst // 2, bf16=True)
    with pytest.raises(UsageError, match="not even one such trial fits"):
        preflight.check_gpu_packing(space, 1.0, 1, tiny)


def test_bf16_asked_of_a_gpu_without_it_is_refused_before_ray(tmp_path):
    path = tmp_path / "bf16.yaml"
    path.write_text("epochs: 2\nfixed: {precision: bf16}\nvariants:\n  sgd: {}\n")
    old = preflight.Gpu("Old GPU", total_bytes=16 * 2**30, bf16=False)
    with pytest.raises(UsageError, match="precision 'bf16'"):
        preflight.check_gpu_packing(load_space(path), 0.5, 2, old)


# ---- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_gpu_defaults_are_bf16_channels_last_and_train(small):
    cuda_data = small.to(torch.device("cuda"))
    result = train(config("swa", device="cuda"), data=cuda_data)
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert result.runtime["precision"] == expected and result.runtime["eval_batch_size"] == 2048
    assert result.runtime["channels_last"] is True
    assert not result.diverged and result.score > 0.3


@pytest.mark.gpu
@needs_cuda
def test_resident_data_and_its_augmentation_stay_on_the_gpu():
    data = load_data(DataSpec(), "cuda")
    assert all(getattr(data, k).is_cuda for k in ("x_train", "y_train", "x_val", "x_test"))
    generator = torch.Generator().manual_seed(0)
    for x, y in itertools.islice(data.train_batches(64, generator, augment=True), 3):
        assert x.is_cuda and y.is_cuda and x.shape == (64, 1, 8, 8)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["sgd", "ema"])
def test_the_step_loop_never_waits_for_the_gpu(small, variant):
    """From the first backward pass on, synchronising with the GPU is an error; the first one must
    be the epoch's end, where the summed loss is read back."""
    cuda_data = small.to(torch.device("cuda"))

    def strict(model):
        torch.cuda.set_sync_debug_mode("error")

    settings = {"epochs": 1, "augment": True, "device": "cuda"} | (
        {"decay": 0.8} if variant == "ema" else {}
    )
    try:
        with pytest.raises(RuntimeError, match="synchroniz") as caught:
            train(config(variant, **settings), data=cuda_data, on_backward=strict)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    frames = [
        f
        for f in traceback.extract_tb(caught.value.__traceback__)
        if f.filename.endswith("loop.py")
    ]
    assert "loss_sum.item()" in (frames[-1].line or "")


@pytest.mark.gpu
@needs_cuda
def test_compile_on_the_gpu_trains():
    data = load_data(DataSpec(dataset="synthetic", synthetic_images=600), "cuda")
    result = train(
        make_config("sgd", {"dataset": "synthetic", "synthetic_images": 600, "model": "airbench",
                            "epochs": 2, "batch_size": 64, "device": "cuda", "compile": True}),
        data=data,
    )  # fmt: skip
    assert result.runtime["compile"] is True and not result.diverged


@pytest.mark.gpu
@needs_cuda
def test_the_estimate_covers_what_a_trial_allocates():
    """The estimate's tensors (context excluded) against the allocator's peak in a real trial's
    steady state (epochs 2 and 3: cuDNN's autotuning, in the first, sizes its workspaces once)."""
    spec = DataSpec(dataset="synthetic", synthetic_images=4000)
    on_cpu = load_data(spec, "cpu")
    settings = make_config(
        "swa", {"dataset": "synthetic", "synthetic_images": 4000, "model": "airbench", "epochs": 3,
                "batch_size": 256, "device": "cuda", "swa_start_frac": 0.5},
    )  # fmt: skip
    data = on_cpu.to(torch.device("cuda"))
    base = torch.cuda.memory_allocated()  # the resident data, and whatever this process holds

    def steady(metrics, save):
        if metrics.epoch == 1:
            torch.cuda.reset_peak_memory_stats()

    train(settings, data=data, on_epoch=steady)
    resident = sum(getattr(data, k).numel() * getattr(data, k).element_size() for k in
                   ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"))  # fmt: skip
    peak = torch.cuda.max_memory_allocated() - base + resident
    cuda = torch.device("cuda")
    dtype = accel.autocast_dtype("auto", cuda, accel.bf16_supported(cuda))
    found = estimate(settings, on_cpu, autocast_dtype=dtype, eval_batch_size=accel.EVAL_BATCH_CUDA)
    assert peak <= found.total - found.context <= 4 * peak


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.slow
@needs_cuda
def test_two_trials_share_one_gpu_through_a_real_search(tmp_path):
    import ray
    from rich.console import Console

    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search

    path = tmp_path / "half.yaml"
    path.write_text(
        "name: half\nsamples: 2\nepochs: 2\nvariants:\n  sgd: {lr: {loguniform: [0.02, 0.1]}}\n"
    )
    options = SearchOptions(
        concurrency=2, gpus_per_trial=0.5, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage=tmp_path / "runs",
    )  # fmt: skip
    try:
        outcome = run_search(load_space(path), options, Console(quiet=True))
    finally:
        ray.shutdown()
    assert not outcome.errors and outcome.trials_per_variant == {"sgd": 2}
    assert outcome.best[0]["final"]["runtime"]["device"].startswith("cuda")
