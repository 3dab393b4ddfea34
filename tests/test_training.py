import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.config import RunConfig
from difflab.ddpm import runs as ckpt
from difflab.ddpm.training import Trainer, TrainingDiverged, train
from difflab.errors import UsageError
from helpers import tiny_config, tiny_run


def test_train_writes_a_complete_run_folder(tmp_path):
    run = tiny_run(tmp_path)
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    cfg = RunConfig.load(run / "config.json")
    assert cfg.model.height == 8 and cfg.model.num_classes == 10 and cfg.model.class_names[3] == "3"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert ckpt.weights_metadata(run / "model.safetensors")["step"] == rows[-1]["step"]
    model, diffusion, loaded = ckpt.load_run(run)
    assert loaded == cfg and diffusion.num_timesteps == 100


def test_loss_goes_down(tmp_path):
    run = tiny_run(tmp_path, epochs=1.0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first


V_MIN_SNR = [
    "diffusion.objective=v",
    "diffusion.loss_weighting=min_snr",
    "diffusion.min_snr_gamma=1",
]
IMPORTANCE = [*V_MIN_SNR, "diffusion.timestep_sampling=importance"]


@pytest.mark.parametrize("sampling", ["uniform", "importance"])
def test_resume_is_exact(tmp_path, sampling):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: identical weights."""
    cfg = tiny_config(epochs=0.2)  # 9 steps of 32 on 1433 digits
    if sampling == "importance":
        cfg = cfg.override(IMPORTANCE)
    straight = tmp_path / "straight"
    r = train(cfg, straight, device="cpu", progress=False)
    assert r.steps == 9
    split = tmp_path / "split"
    train(cfg, split, device="cpu", progress=False, stop_at_step=4)
    assert ckpt.weights_metadata(split / "model.safetensors")["step"] == 4
    train(cfg, split, device="cpu", progress=False, resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(straight / "train_state.pt", weights_only=True)
    sb = torch.load(split / "train_state.pt", weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    steps = [
        json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 10))


def test_importance_sampling_trains_on_its_own_timesteps(tmp_path, monkeypatch):
    """The trainer draws t through the diffusion's sampler: importance sampling changes the
    draws (so the weights) towards the timesteps that the loss weighting weighs most."""
    from difflab.ddpm.diffusion import GaussianDiffusion

    drawn = []
    original = GaussianDiffusion.sample_timesteps

    def spy(self, n, generator):
        t = original(self, n, generator)
        drawn.append((self.cfg.timestep_sampling, t.clone()))
        return t

    monkeypatch.setattr(GaussianDiffusion, "sample_timesteps", spy)
    weighted = tiny_config(epochs=0.1).override(V_MIN_SNR)
    train(weighted, tmp_path / "uniform", device="cpu", progress=False)
    train(weighted.override(IMPORTANCE), tmp_path / "importance", device="cpu", progress=False)
    kinds = {kind for kind, _ in drawn}
    assert kinds == {"uniform", "importance"}
    uni = torch.cat([t for kind, t in drawn if kind == "uniform"])
    imp = torch.cat([t for kind, t in drawn if kind == "importance"])
    assert len(uni) == len(imp) > 0 and not torch.equal(uni, imp)
    weight = GaussianDiffusion(weighted.diffusion).loss_weight
    assert weight(imp).mean() > 1.5 * weight(uni).mean()
    a = load_file(tmp_path / "uniform" / "model.safetensors")
    b = load_file(tmp_path / "importance" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_out_with_a_run_needs_resume(tmp_path):
    run = tiny_run(tmp_path)
    with pytest.raises(UsageError, match="--resume"):
        train(tiny_config(), run, device="cpu", progress=False)


def test_resume_without_state(tmp_path):
    with pytest.raises(UsageError, match="no such run folder"):
        train(tiny_config(), tmp_path / "nothing", device="cpu", progress=False, resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=0.3)
    cfg = cfg.override(["train.checkpoint_every=3"])
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    original = trainer.diffusion.training_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = original(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer.diffusion, "training_loss", poisoned)
    good = None
    with pytest.raises(TrainingDiverged, match="step 4.*checkpoint of step 3"):
        trainer.fit()
    good = load_file(tmp_path / "run" / "model.safetensors")
    assert ckpt.weights_metadata(tmp_path / "run" / "model.safetensors")["step"] == 3
    assert all(torch.isfinite(v).all() for v in good.values())


def test_losses_read_back_in_batches_log_the_same_and_still_catch_nan(tmp_path, monkeypatch):
    """The losses stay on the device between log rows: rows every 3 steps average the same
    losses as rows every step, and a NaN between two rows still stops training before the
    next checkpoint, naming its step."""
    every = train(tiny_config(epochs=0.2), tmp_path / "every", device="cpu", progress=False)
    third = tiny_config(epochs=0.2).override(["train.log_every=3"])
    train(third, tmp_path / "third", device="cpu", progress=False)
    rows1 = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    rows3 = [json.loads(x) for x in (tmp_path / "third" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows3] == [
        s for s in range(1, every.steps + 1) if s % 3 == 0 or s == every.steps
    ]
    for r in rows3:
        window = [x["loss"] for x in rows1 if r["step"] - 3 < x["step"] <= r["step"]]
        assert r["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)

    cfg = tiny_config(epochs=0.3).override(["train.log_every=5", "train.checkpoint_every=3"])
    trainer = Trainer(cfg, tmp_path / "nan", device="cpu", progress=False)
    original = trainer.diffusion.training_loss

    def poisoned(*a, **k):
        loss = original(*a, **k)
        return loss * float("nan") if trainer.step == 4 else loss

    monkeypatch.setattr(trainer.diffusion, "training_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 4.*checkpoint of step 3"):
        trainer.fit()
    assert trainer.step == 5  # found when step 5 was logged, before step 6's checkpoint
    assert ckpt.weights_metadata(tmp_path / "nan" / "model.safetensors")["step"] == 3
    assert all(
        torch.isfinite(v).all() for v in load_file(tmp_path / "nan" / "model.safetensors").values()
    )
    assert not (tmp_path / "nan" / "metrics.jsonl").exists() or all(
        json.loads(x)["step"] < 4
        for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    )


def test_killed_checkpoint_write_leaves_previous_files(tmp_path, monkeypatch):
    run = tiny_run(tmp_path)
    before = (run / "train_state.pt").read_bytes()

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    trainer = Trainer(tiny_config(epochs=0.2), run, device="cpu", progress=False, resume=True)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (run / "train_state.pt").read_bytes() == before
    left = [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert not left, "temporary files left behind"
    monkeypatch.undo()
    ckpt.load_train_state(run)


def test_config_rejects_unknown_and_wrong_typed_keys(tmp_path):
    data = tiny_config().to_dict()
    data["train"]["learning_rate"] = 1
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        RunConfig.from_dict(data)
    data = tiny_config().to_dict()
    data["train"]["batch_size"] = "big"
    with pytest.raises(UsageError, match="batch_size: expected an integer"):
        RunConfig.from_dict(data)
    data = tiny_config().to_dict()
    data["diffusion"]["schedule"] = "sigmoid"
    with pytest.raises(UsageError, match="choose one of linear, cosine"):
        RunConfig.from_dict(data)
    assert RunConfig.from_dict(tiny_config().to_dict()) == tiny_config()


def test_override_from_the_command_line():
    cfg = tiny_config().override(
        ["train.lr=0.01", "model.channel_mults=[1,2,2]", "diffusion.objective=v"]
    )
    assert (
        cfg.train.lr == 0.01
        and cfg.model.channel_mults == (1, 2, 2)
        and cfg.diffusion.objective == "v"
    )
    with pytest.raises(UsageError, match="unknown key"):
        tiny_config().override(["train.nope=1"])


def test_pickle_weights_are_refused(tmp_path):
    run = tiny_run(tmp_path)
    state = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}  # not mmapped
    torch.save(state, run / "model.safetensors")  # a pickle where safetensors belong
    with pytest.raises(UsageError, match="pickle"):
        ckpt.load_run(run)
    torch.save(state, tmp_path / "w.pt")
    assert ckpt.load_weights(tmp_path / "w.pt", trust_pickle=True).keys() == state.keys()
    with pytest.raises(UsageError, match="--trust-pickle"):
        ckpt.load_weights(tmp_path / "w.pt")


def test_init_from_keeps_weights_and_maps_classes(tmp_path):
    from dataclasses import replace

    from difflab.ddpm.model import ContextUnet
    from difflab.ddpm.training import init_from_run

    source = tiny_run(tmp_path, name="source")
    src = load_file(source / "model.safetensors")
    cfg = RunConfig.load(source / "config.json").model
    # same classes: every tensor is the source's EMA weight
    same = ContextUnet(cfg)
    init_from_run(same, source)
    for k, v in same.state_dict().items():
        assert torch.equal(v, src[k]), k
    # two more classes: old rows kept, "no class" moved to the end, new rows start as "no class"
    bigger = ContextUnet(replace(cfg, num_classes=12, class_names=()))
    init_from_run(bigger, source)
    emb, old = bigger.class_embed.weight, src["class_embed.weight"]
    assert emb.shape[0] == 13
    assert torch.equal(emb[:10], old[:10])
    for row in (10, 11, 12):
        assert torch.equal(emb[row], old[10])
    # another architecture is refused by name
    with pytest.raises(UsageError, match="model.base_channels is 8, this run needs 16"):
        init_from_run(ContextUnet(replace(cfg, base_channels=16)), source)


def test_init_from_through_training(tmp_path):
    source = tiny_run(tmp_path, name="source")
    run = tmp_path / "tuned"
    trainer = Trainer(tiny_config(init_from=str(source)), run, device="cpu", progress=False)
    src = load_file(source / "model.safetensors")
    start = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(start[k], src[k]) for k in src)
    trainer.fit()
    assert RunConfig.load(run / "config.json").train.init_from == str(source)


def test_speed_options_are_accepted_on_cpu(tmp_path):
    """channels_last trains on the CPU, with the fused AdamW; the data stays in CPU memory."""
    trainer = Trainer(
        tiny_config(channels_last=True), tmp_path / "run", device="cpu", progress=False
    )
    assert trainer.optimizer.defaults.get("fused")
    assert trainer.images.device.type == "cpu"
    result = trainer.fit()
    assert result.steps == 5 and torch.isfinite(torch.tensor(result.final_loss))
    assert RunConfig.load(tmp_path / "run" / "config.json").train.channels_last


@pytest.mark.parametrize("pinned", ["fp32", "bf16"])
def test_auto_mixed_precision_on_cpu_trains_as_the_machine_choice(tmp_path, monkeypatch, pinned):
    """train.mixed_precision=auto on a CPU autocasts the network as the machine's choice says
    (pinned here by $DIFFLAB_CPU_PRECISION), and the result names it."""
    from difflab import devices

    monkeypatch.setenv(devices.CPU_PRECISION_ENV, pinned)
    devices.cpu_training_precision.cache_clear()
    seen = []
    trainer = Trainer(tiny_config(), tmp_path / "run", device="cpu", progress=False)
    forward = trainer.raw_model.forward

    def spy(*args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(*args)

    monkeypatch.setattr(trainer.raw_model, "forward", spy)
    result = trainer.fit()
    assert result.precision == pinned and len(seen) == result.steps == 5
    assert set(seen) == ({torch.bfloat16} if pinned == "bf16" else {None})
    devices.cpu_training_precision.cache_clear()


def test_compile_flag_is_validated():
    data = tiny_config().to_dict()
    data["train"]["compile"] = "yes"
    with pytest.raises(UsageError, match="compile: expected true or false"):
        RunConfig.from_dict(data)
    assert tiny_config().override(["train.compile=true"]).train.compile is True


def test_failed_compile_falls_back_to_eager(tmp_path, monkeypatch):
    def broken_compile(model, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no working C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed.*C\\+\\+ compiler.*without it"):
        trainer = Trainer(tiny_config(compile=True), tmp_path / "run", device="cpu", progress=False)
    assert trainer.accelerator.unwrap_model(trainer.model) is trainer.raw_model
    trainer.fit()
    eager = tiny_run(tmp_path, name="eager")
    a, b = load_file(eager / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed attempt left no trace


@pytest.mark.slow  # inductor compiles forward and backward: ~80 s on two cores (cold cache)
def test_compiled_training_matches_eager(tmp_path):
    trainer = Trainer(tiny_config(compile=True), tmp_path / "run", device="cpu", progress=False)
    assert trainer.accelerator.unwrap_model(trainer.model) is not trainer.raw_model
    result = trainer.fit()
    eager = train(tiny_config(), tmp_path / "eager", device="cpu", progress=False)
    assert result.final_loss == pytest.approx(eager.final_loss, rel=1e-4)
    model, _, _ = ckpt.load_run(tmp_path / "run")  # plain ContextUnet keys, no "_orig_mod."
    assert set(model.state_dict()) == set(load_file(tmp_path / "eager" / "model.safetensors"))


@pytest.mark.gpu
def test_training_steps_never_wait_for_the_gpu(tmp_path):
    """Between two log rows a step makes no host-device synchronisation (draws on the GPU,
    loss kept there, one multi-tensor EMA update)."""
    cfg = tiny_config(epochs=1.0).override(["train.log_every=1000", "train.checkpoint_every=1000"])
    trainer = Trainer(cfg, tmp_path / "run", device="cuda", progress=False)
    trainer.train_step(1e-3)  # first step: lazy optimizer state and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step(1e-3) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in losses) and all(torch.isfinite(v) for v in losses)


@pytest.mark.gpu
def test_speed_options_on_cuda(tmp_path):
    cfg = tiny_config(channels_last=True)
    trainer = Trainer(cfg, tmp_path / "run", device="cuda", progress=False)
    assert trainer.optimizer.defaults.get("fused") is True
    assert trainer.images.device.type == "cuda"  # the digits fit easily
    assert trainer.fit().steps == 5


@pytest.mark.parametrize(
    ("preset", "dataset", "shape", "levels"),
    [("quick", "mnist5k", (1, 28, 28), 2), ("paper", "mnist", (1, 28, 28), 3),
     ("cifar10", "cifar10", (3, 32, 32), 4)],
)  # fmt: skip
def test_each_preset_fits_its_dataset(preset, dataset, shape, levels):
    """Every preset names its dataset, keeps all its levels at that dataset's size, and its
    network maps a batch of that shape to the same shape."""
    from difflab.config import get_preset
    from difflab.ddpm.data import ImageData
    from difflab.ddpm.model import ContextUnet
    from difflab.ddpm.training import resolve_config

    cfg = get_preset(preset)
    assert cfg.train.dataset == dataset
    fake = ImageData(
        torch.zeros((10, *shape), dtype=torch.uint8), torch.arange(10), tuple("abcdefghij"),
        dataset, "train",
    )  # fmt: skip
    resolved = resolve_config(cfg, fake)
    assert len(resolved.model.channel_mults) == levels
    assert resolved.model.channel_mults == cfg.model.channel_mults
    net = ContextUnet(resolved.model).eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape), torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, *shape) and torch.isfinite(out).all()
