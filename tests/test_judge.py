"""The reference classifier (judge) and the sample metrics computed with it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.ddpm.data import load_dataset
from difflab.errors import UsageError
from difflab.evaluation import judge as judge_mod
from difflab.evaluation.distances import frechet_distance
from difflab.evaluation.judge import FEATURE_DIM, Judge, JudgeNet, get_judge, train_judge
from difflab.evaluation.metrics import conditional_accuracy, diversity, features_of, real_floor


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Judge, str]:
    """A digits judge trained (2 epochs, to stay fast) into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("judges")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(judge_mod, "default_epochs", lambda n: 2)
        judge = get_judge("digits", cache_dir=folder, progress=False)
    return folder, judge, err.getvalue()


@pytest.fixture(scope="module")
def digits_judge(judge_dir: tuple[Path, Judge, str]) -> Judge:
    return judge_dir[1]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 9, 13)])
def test_judgenet_shapes(shape: tuple[int, int, int]) -> None:
    net = JudgeNet(shape[0], 7).eval()
    x = torch.rand(5, *shape) * 2 - 1
    assert net(x).shape == (5, 7)
    assert net.features(x).shape == (5, FEATURE_DIM)


def test_train_judge_learns_and_is_deterministic() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    net_a, info = train_judge(train, test, epochs=2, seed=1, progress=False)
    net_b, _ = train_judge(train, test, epochs=2, seed=1, progress=False)
    assert info["test_accuracy"] > 0.8
    assert info["epochs"] == 2 and info["seconds"] > 0 and not net_a.training
    sa, sb = net_a.state_dict(), net_b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_get_judge_caches_and_reloads(judge_dir, monkeypatch, capsys) -> None:
    folder, first, err = judge_dir
    assert "training the reference classifier for digits (first use" in err
    assert (folder / "digits.safetensors").exists() and (folder / "digits.json").exists()
    assert first.test_accuracy > 0.5 and first.num_classes == 10 and first.dataset == "digits"

    def boom(*a, **k):
        raise AssertionError("a cached judge must not be retrained")

    monkeypatch.setattr(judge_mod, "train_judge", boom)
    second = get_judge("digits", cache_dir=folder, progress=False)
    assert capsys.readouterr().err == ""
    x = load_dataset("digits", "test").to_float()
    assert torch.equal(first.logits(x), second.logits(x))
    assert second.test_accuracy == first.test_accuracy
    assert second.predict(x).dtype == torch.int64
    assert second.features(x).shape == (len(x), FEATURE_DIM)
    monkeypatch.setenv("DIFFLAB_CACHE", str(folder.parent))
    assert judge_mod.cache_root() == folder.parent / "judges"
    # a recipe change retrains, and so does a damaged weights file
    version = judge_mod.RECIPE_VERSION
    monkeypatch.setattr(judge_mod, "RECIPE_VERSION", version + 1)
    with pytest.raises(AssertionError, match="must not be retrained"):
        get_judge("digits", cache_dir=folder, progress=False)
    monkeypatch.setattr(judge_mod, "RECIPE_VERSION", version)
    (folder / "digits.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AssertionError, match="must not be retrained"):
        get_judge("digits", cache_dir=folder, progress=False)


def test_folder_judge_is_keyed_on_path_and_retrains_when_folder_changes(
    tmp_path, monkeypatch
) -> None:
    from PIL import Image

    from difflab.ddpm.data import clear_cache

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60 if c == "a" else 255, size=(12, 12), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.setattr(judge_mod, "default_epochs", lambda n: 1)
    name = f"folder:{tmp_path / 'imgs'}"
    judge = get_judge(name, cache_dir=tmp_path / "cache", progress=False)
    assert judge.num_classes == 2 and judge.class_names == ["a", "b"]
    assert (tmp_path / "cache" / f"{judge_mod.cache_key(name)}.safetensors").exists()
    calls = []
    real_train = judge_mod.train_judge
    monkeypatch.setattr(
        judge_mod, "train_judge", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    get_judge(name, cache_dir=tmp_path / "cache", progress=False)
    assert calls == []
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    clear_cache()
    get_judge(name, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [1]


def test_cache_key_for_folders(tmp_path) -> None:
    key = judge_mod.cache_key(f"folder:{tmp_path}")
    assert key.startswith("folder-") and "/" not in key
    assert key == judge_mod.cache_key(f"folder:{tmp_path}/../{tmp_path.name}")
    assert judge_mod.cache_key("MNIST5K") == "mnist5k"


def test_judge_checks_input(digits_judge: Judge) -> None:
    with pytest.raises(UsageError, match="8, 8"):
        digits_judge.predict(torch.zeros(2, 1, 28, 28))
    with pytest.raises(UsageError, match=r"\[-1, 1\]"):
        digits_judge.predict(torch.full((2, 1, 8, 8), 255.0))
    u8 = load_dataset("digits", "test").images[:10]
    assert torch.equal(digits_judge.predict(u8), digits_judge.predict(u8.float() / 127.5 - 1))
    assert digits_judge.features(torch.zeros(0, 1, 8, 8)).shape == (0, FEATURE_DIM)


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(a).float(), a) == pytest.approx(0.0, abs=1e-4)
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    var1, var2 = np.array([1.0, 2.0, 0.5, 4.0]), np.array([0.25, 2.0, 3.0, 1.0])
    x = mu1 + rng.normal(size=(100_000, 4)) * np.sqrt(var1)
    y = mu2 + rng.normal(size=(100_000, 4)) * np.sqrt(var2)
    exact = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-6)
    # fewer samples than dimensions: a singular covariance still gives a finite value
    assert np.isfinite(frechet_distance(rng.normal(size=(5, 20)), rng.normal(size=(6, 20))))
    with pytest.raises(UsageError):
        frechet_distance(a[:1], a)


def test_conditional_accuracy(digits_judge: Judge) -> None:
    test = load_dataset("digits", "test")
    acc = conditional_accuracy(digits_judge, test.to_float(), test.labels)
    assert acc["overall"] == pytest.approx(digits_judge.test_accuracy)
    assert acc["n"] == len(test) and len(acc["per_class"]) == 10
    assert all(0.0 <= p <= 1.0 for p in acc["per_class"])
    shuffled = test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    assert conditional_accuracy(digits_judge, test.to_float(), shuffled)["overall"] < 0.3
    only_3 = test.labels == 3
    part = conditional_accuracy(digits_judge, test.to_float()[only_3], test.labels[only_3])
    assert part["per_class"][3] is not None
    assert all(p is None for c, p in enumerate(part["per_class"]) if c != 3)
    with pytest.raises(UsageError, match="0..9"):
        conditional_accuracy(digits_judge, test.to_float()[:2], torch.tensor([0, 10]))


def test_diversity() -> None:
    same = torch.ones(6, 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert diversity(same, labels)["mean"] == 0.0
    rng = torch.Generator().manual_seed(0)
    narrow = diversity(torch.randn(40, 4, generator=rng) * 0.1, torch.arange(40) % 2)
    wide = diversity(torch.randn(40, 4, generator=rng), torch.arange(40) % 2)
    assert 0 < narrow["mean"] < wide["mean"]
    two = diversity(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]), torch.tensor([1, 1, 2]))
    assert two["per_class"] == [None, 5.0, None] and two["mean"] == 5.0


def test_features_and_real_floor(digits_judge: Judge) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    f = features_of(digits_judge, test)
    assert f.shape == (len(test), FEATURE_DIM) and f.dtype == torch.float32
    assert features_of(digits_judge, test) is f  # cached
    floor = real_floor(digits_judge, train, test)
    assert floor > 0 and real_floor(digits_judge, train, test) == floor
    noise = torch.rand(len(test), 1, 8, 8) * 2 - 1
    assert frechet_distance(digits_judge.features(noise), f) > 5 * floor


@pytest.mark.slow
def test_mnist5k_judge_accuracy(tmp_path) -> None:
    judge = get_judge("mnist5k", cache_dir=tmp_path, progress=False)
    assert judge.test_accuracy >= 0.975
    assert judge.meta["epochs"] == 10 and judge.meta["num_train"] == 4000
