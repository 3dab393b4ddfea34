"""Figures of the forward and reverse processes, plots and labelled sample grids."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.checks import parse_t_list
from difflab.cli import main
from difflab.config import DiffusionConfig, ModelConfig, RunConfig
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.generate import sample_labels, sample_run
from difflab.ddpm.model import ContextUnet
from difflab.ddpm.processes import (
    forward_figure,
    forward_process,
    not_pure_noise_note,
    reverse_figure,
)
from difflab.ddpm.runs import save_config, save_weights
from difflab.errors import UsageError
from difflab.figures.images import Panel, draw_table, png_settings, to_uint8
from difflab.figures.process import frame_indices
from difflab.options import ForwardOptions, ReverseOptions, SampleOptions
from helpers import tiny_config, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("fig"))


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """An untrained 3-channel, non-square (8 x 12) run: enough to exercise every figure."""
    out = tmp_path_factory.mktemp("rgb") / "run"
    out.mkdir()
    cfg = RunConfig(
        preset="test",
        model=ModelConfig(in_channels=3, height=8, width=12, num_classes=2, class_names=("cat", "dog"),
                          base_channels=8, channel_mults=(1, 2), time_embed_dim=16),
        diffusion=DiffusionConfig(timesteps=40, beta_end=0.5),
    )  # fmt: skip
    save_config(cfg, out)
    save_weights(ContextUnet(cfg.model), out / "model.safetensors")
    return out


def boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def assert_clean_layout(table, size):
    """Every tile and text inside the image; no text overlaps another text or a tile."""
    assert table.image.size == size
    boxes = list(table.tiles.values()) + table.texts
    for b in boxes:
        assert 0 <= b[0] < b[2] <= size[0] and 0 <= b[1] < b[3] <= size[1], b
    for a, b in itertools.combinations(boxes, 2):
        assert not boxes_overlap(a, b), (a, b)


def tile(png, box, scale):
    """Crop a tile out of a PNG and undo the nearest-neighbour zoom: (h, w, C) uint8."""
    arr = np.asarray(Image.open(png).convert("RGB"))[
        box[1] : box[3] : scale, box[0] : box[2] : scale
    ]
    return arr


def one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err


# -- --t ------------------------------------------------------------------------------------
def test_parse_t_list_accepts_integers_and_expressions_of_T():
    assert parse_t_list("T,T/2,T/4,1,0", 1000) == [1000, 500, 250, 1, 0]
    assert parse_t_list("3T/4, 3*T/4 ,T / 3,999", 1000) == [750, 750, 333, 999]
    assert parse_t_list([0, "T"], 100) == [0, 100]


@pytest.mark.parametrize("bad", ["T/0", "2T", "1001", "-1", "x", "", "T/2.5", "1.5", "T,,0", "t"])
def test_parse_t_list_refuses_anything_else(bad):
    with pytest.raises(
        UsageError, match=r"^--t .*use integers 0\.\.1000 or expressions like T, T/2, 3T/4$"
    ):
        parse_t_list(bad, 1000)


# -- forward ----------------------------------------------------------------------------------
def test_forward_process_keeps_x0_at_0_and_is_pure_noise_at_T():
    diffusion = GaussianDiffusion(DiffusionConfig())  # linear, T = 1000
    x0 = load_dataset("digits", "train").to_float(slice(0, 400))  # (400, 1, 8, 8)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    cols = forward_process(diffusion, x0, [0, 1, 1000], noise)
    assert cols.shape == (400, 3, 1, 8, 8)
    assert torch.equal(cols[:, 0], x0)
    assert (cols[:, 1] - x0).std() < 0.011  # one step: sqrt(beta_1) = 0.01 of noise
    assert abs(cols[:, 2].mean().item()) < 0.02 and abs(cols[:, 2].std().item() - 1) < 0.02
    assert x0.mean() < -0.3  # the images themselves are far from N(0, 1)


def test_forward_figure_layout_and_the_t0_column_is_the_input(tmp_path):
    opts = ForwardOptions(dataset="digits", t="T,T/2,0", per_class=2, seed=3)
    r = forward_figure(opts, tmp_path / "f.png")
    s = png_settings(r.path)
    assert r.t == s["t"] == [0, 500, 1000] and s["T"] == 1000 and s["schedule"] == "linear"
    size = Image.open(r.path).size
    assert_clean_layout(r.table, size)
    assert sorted(r.table.tiles) == [(0, row, col) for row in range(20) for col in range(3)]
    data = load_dataset("digits", "train")
    assert data.labels[s["images"]].tolist() == [c for c in range(10) for _ in range(2)]
    scale = (r.table.tiles[0, 0, 0][2] - r.table.tiles[0, 0, 0][0]) // 8
    assert scale == 12  # 8 px images zoomed to ~96 px
    for row, i in enumerate(s["images"]):
        want = data.images[i].permute(1, 2, 0).numpy()  # (8, 8, 1)
        assert np.array_equal(tile(r.path, r.table.tiles[0, row, 0], scale)[..., :1], want)
    noisy = tile(r.path, r.table.tiles[0, 0, 2], scale)
    assert not np.array_equal(noisy[..., :1], data.images[s["images"][0]].permute(1, 2, 0).numpy())


def test_forward_is_deterministic_and_uses_the_runs_schedule(run, tmp_path, capsys):
    args = ["forward", "--run", str(run), "--t", "T,T/2,0"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = ((tmp_path / f"{n}.png").read_bytes() for n in "abc")
    assert a == b and a != c
    s = png_settings(tmp_path / "a.png")
    assert s["T"] == 100 and s["t"] == [0, 50, 100] and s["dataset"] == "digits"
    assert "wrote" in capsys.readouterr().out


def test_not_pure_noise_warning():
    assert not_pure_noise_note(GaussianDiffusion(DiffusionConfig(), warn=False)) is None
    note = not_pure_noise_note(GaussianDiffusion(DiffusionConfig(timesteps=400), warn=False))
    assert "not pure noise" in note and "T = 400" in note and "13%" in note


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            ["--t", "T/0"],
            "--t 'T/0': division by zero; use integers 0..1000 or expressions like T, T/2, 3T/4",
        ),
        (["--t", "2T"], "--t '2T': 2000 is beyond T = 1000"),
        (["--t", "T/2,half"], "--t 'half': not a step"),
        (["--per-class", "0"], "--per-class 0"),
        (["--dataset", "imagenet"], "--dataset 'imagenet'"),
    ],
)
def test_forward_bad_input(tmp_path, capsys, extra, match):
    assert main(["forward", "--dataset", "digits", *extra, "--out", str(tmp_path / "f.png")]) == 2
    one_line_error(capsys, match)
    assert list(tmp_path.iterdir()) == []


def test_forward_bad_paths(tmp_path, capsys):
    assert main(["forward", "--out", str(tmp_path / "missing" / "f.png")]) == 2
    one_line_error(capsys, "does not exist")
    assert main(["forward", "--out", str(tmp_path / "f.jpg")]) == 2
    one_line_error(capsys, "--out")
    assert main(["forward", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "f.png")]) == 2
    one_line_error(capsys, "no such run folder")
    assert list(tmp_path.iterdir()) == []


def test_forward_colour_images(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    r = forward_figure(
        ForwardOptions(dataset=f"folder:{tmp_path / 'data'}", t="0,T"), tmp_path / "f.png"
    )
    assert_clean_layout(r.table, Image.open(r.path).size)
    box = r.table.tiles[0, 1, 0]
    scale = (box[2] - box[0]) // 14
    assert (box[3] - box[1]) // scale == 10
    data = load_dataset(f"folder:{tmp_path / 'data'}", "train")
    want = data.images[png_settings(r.path)["images"][1]].permute(1, 2, 0).numpy()
    assert np.array_equal(tile(r.path, box, scale), want)


# -- reverse ----------------------------------------------------------------------------------
def test_reverse_figure_ddim_picks_the_nearest_steps_and_gif_has_a_frame_per_step(
    run, tmp_path, capsys
):
    png, gif = tmp_path / "r.png", tmp_path / "r.gif"
    args = [
        "reverse",
        str(run),
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--classes",
        "0,3",
        "--device",
        "cpu",
    ]
    assert main([*args, "--out", str(png), "--gif", str(gif)]) == 0
    assert "11 frames" in capsys.readouterr().out
    s = png_settings(png)
    # trailing spacing, T = 100: x_t at indices 99, 89, ..., 9, so paper t 100, 90, ..., 10
    assert s["t"] == [100, 50, 30, 10, 0] and s["steps"] == 10 and s["sampler"] == "ddim"
    with Image.open(gif) as im:
        assert im.n_frames == 10 + 1  # x_t of every step, then the final x_0
        assert im.info["loop"] == 0
    first = (png.read_bytes(), gif.read_bytes())
    assert main([*args, "--out", str(png), "--gif", str(gif)]) == 0
    assert (png.read_bytes(), gif.read_bytes()) == first  # byte for byte on CPU


def test_reverse_default_is_ddpm_with_every_step(run, tmp_path):
    r = reverse_figure(
        run,
        ReverseOptions(classes="1,2"),
        tmp_path / "r.png",
        gif=tmp_path / "r.gif",
        progress=False,
    )
    assert r.t == [100, 50, 25, 1, 0]  # exact
    assert r.settings["sampler"] == "ddpm" and r.settings["steps"] == 100
    assert r.frames == 101 and Image.open(tmp_path / "r.gif").n_frames == 101
    assert_clean_layout(r.table, Image.open(r.path).size)
    assert sorted(r.table.tiles) == [
        (p, row, c) for p in range(2) for row in range(2) for c in range(5)
    ]


def test_reverse_columns_come_from_the_sampling_trajectory(run, tmp_path):
    from difflab.ddpm.runs import load_run

    opts = ReverseOptions(classes="0,3", sampler="ddim", steps=5, guidance=2.0)
    r = reverse_figure(run, opts, tmp_path / "r.png", progress=False)
    model, diffusion, _ = load_run(run)
    x0 = sample_labels(model, diffusion, torch.tensor([0, 3]), guidance=2.0, steps=5, sampler="ddim",
                       seed=0, progress=False)  # fmt: skip
    want = to_uint8(x0)
    assert r.t == [100, 60, 20, 0]  # x_t at indices 99, 79, 59, 39, 19: nearest, duplicates merged
    box = r.table.tiles[0, 0, 3]
    scale = (box[2] - box[0]) // 8
    for p, row in itertools.product(range(2), range(2)):  # t = 0: the final sample in both panels
        got = tile(r.path, r.table.tiles[p, row, 3], scale)[..., :1]
        assert np.array_equal(got, want[row])


def test_reverse_colour_non_square_with_mp4(rgb_run, tmp_path):
    import imageio.v2 as imageio

    r = reverse_figure(rgb_run, ReverseOptions(t="T,0", sampler="ddim", steps=4), tmp_path / "r.png",
                       gif=tmp_path / "r.gif", mp4=tmp_path / "r.mp4", progress=False)  # fmt: skip
    assert r.t == [40, 0] and r.frames == 5
    assert_clean_layout(r.table, Image.open(r.path).size)
    box = r.table.tiles[0, 0, 0]
    assert (box[2] - box[0]) * 8 == (box[3] - box[1]) * 12  # 12 wide, 8 high
    colour = tile(r.path, box, (box[2] - box[0]) // 12).astype(int)
    assert (colour[..., 0] != colour[..., 1]).any()  # not a grey image
    reader = imageio.get_reader(tmp_path / "r.mp4")
    frame = reader.get_data(0)
    assert frame.shape[0] % 16 == 0 and frame.shape[1] % 16 == 0 and frame.shape[2] == 3
    reader.close()
    assert {p.name for p in tmp_path.iterdir()} == {"r.png", "r.gif", "r.mp4"}


def test_frame_indices_keep_first_and_last():
    assert frame_indices(11) == list(range(11))
    idx = frame_indices(1001)
    assert idx[0] == 0 and idx[-1] == 1000 and len(idx) <= 120 and idx == sorted(set(idx))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--t", "T/0"], "--t 'T/0'"),
        (["--steps", "0", "--sampler", "ddim"], "--steps 0"),
        (["--sampler", "plms"], "--sampler 'plms'"),
        (["--classes", "0,12"], "--classes: 12 is out of range"),
        (["--gif", "x.png"], "--gif"),
        (["--mp4", "missing/x.mp4"], "--mp4"),
    ],
)
def test_reverse_bad_input(run, tmp_path, capsys, extra, match):
    extra = [str(tmp_path / v) if v.endswith((".png", ".mp4")) else v for v in extra]
    assert (
        main(["reverse", str(run), "--device", "cpu", *extra, "--out", str(tmp_path / "r.png")])
        == 2
    )
    one_line_error(capsys, match)
    assert list(tmp_path.iterdir()) == []


# -- plot ---------------------------------------------------------------------------------------
def test_plot_writes_loss_and_schedule(run, tmp_path, capsys):
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "schedule.png"]
    assert Image.open(tmp_path / "loss.png").size == (800, 450)
    assert Image.open(tmp_path / "schedule.png").size == (1100, 480)
    assert png_settings(tmp_path / "schedule.png")["T"] == 100
    first = (tmp_path / "loss.png").read_bytes(), (tmp_path / "schedule.png").read_bytes()
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0
    assert ((tmp_path / "loss.png").read_bytes(), (tmp_path / "schedule.png").read_bytes()) == first
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, "does not exist")


def test_schedule_plot_warns_when_x_T_is_not_pure_noise():
    from difflab.ddpm.processes import run_schedule_figure

    warn = run_schedule_figure(GaussianDiffusion(DiffusionConfig(timesteps=400), warn=False))
    assert "not pure noise" in warn.get_supxlabel() and "13.2%" in warn.get_supxlabel()
    fine = run_schedule_figure(GaussianDiffusion(DiffusionConfig(), warn=False))
    assert "is pure noise" in fine.get_supxlabel() and "0.64%" in fine.get_supxlabel()


def test_plot_without_metrics_draws_the_schedule_only(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(), run)
    assert main(["plot", str(run)]) == 0
    assert "skipped loss.png" in capsys.readouterr().out
    assert [p.name for p in (run / "figures").iterdir()] == ["schedule.png"]


# -- sample grids ------------------------------------------------------------------------------
def test_sample_grid_guidance_columns_share_the_noise(run, tmp_path):
    grid = SampleOptions(classes="0,1,2", guidance="0,1,3", cols="guidance", steps=3)
    r = sample_run(run, grid, tmp_path / "g.png", progress=False)
    s = png_settings(tmp_path / "g.png")
    assert s["guidance"] == [0, 1, 3] and s["rows"] == "class" and s["cols"] == "guidance"
    assert s["n_per_class"] == 1 and r.images.shape[0] == 9
    single = SampleOptions(classes="0,1,2", guidance=1, n_per_class=1, steps=3)
    one = sample_run(run, single, tmp_path / "one.npz", progress=False)
    assert torch.equal(r.images[3:6], one.images)  # the s = 1 cells are the plain s = 1 samples
    assert not torch.equal(r.images[0:3], r.images[6:9])
    width, height = Image.open(tmp_path / "g.png").size
    assert width >= 3 * 64 and height >= 3 * 64


def test_sample_grid_steps_rows_by_cli(run, tmp_path, capsys):
    out = tmp_path / "s.png"
    args = [
        "sample",
        str(run),
        "--classes",
        "4",
        "--steps",
        "2,5",
        "--rows",
        "steps",
        "--cols",
        "class",
    ]
    assert main([*args, "--n-per-class", "2", "--device", "cpu", "--out", str(out)]) == 0
    s = png_settings(out)
    assert s["steps"] == [2, 5] and s["rows"] == "steps" and s["cols"] == "class"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--guidance", "0,1", "--steps", "2,4"], "put one on --rows, the other on --cols"),
        (
            ["--guidance", "0,1", "--cols", "sample"],
            "--guidance: several values need --rows guidance or --cols guidance",
        ),
        (
            ["--rows", "guidance", "--cols", "guidance"],
            "--cols guidance: must differ from --rows guidance",
        ),
        (["--cols", "seed"], "--cols 'seed'"),
        (["--guidance", "1,x"], "--guidance '1,x'"),
        (["--steps", "2.5"], "--steps '2.5'"),
        (["--guidance", "0,1", "--out", "x.npz"], "write a .png"),
    ],
)
def test_sample_grid_bad_input(run, tmp_path, capsys, extra, match):
    if "--out" not in extra:
        extra = [*extra, "--out", "x.png"]
    extra = [str(tmp_path / v) if v.startswith("x.") else v for v in extra]
    assert main(["sample", str(run), "--device", "cpu", *extra]) == 2
    one_line_error(capsys, match)
    assert list(tmp_path.iterdir()) == []


# -- drawing ------------------------------------------------------------------------------------
def test_draw_table_widens_columns_for_long_headers():
    images = np.zeros((3, 4, 8, 8, 1), dtype=np.uint8)
    labels = [f"t = {t}\n√ᾱ = 0.006" for t in (1000, 500, 250, 1)]
    table = draw_table([Panel(images, labels, "xₜ"), Panel(images, labels, "predicted x₀")],
                       row_labels=["zero", "one", "two"], title="A title\nand a subtitle",
                       note="a warning under the tiles", scale=2)  # fmt: skip
    assert_clean_layout(table, table.image.size)
    assert len(table.tiles) == 2 * 3 * 4


def test_before_after_of_an_init_from_run(tmp_path):
    import json
    import shutil

    from difflab.ddpm.processes import before_after_samples
    from difflab.experiments.report import write_report

    source = tiny_run(tmp_path, name="source")
    same = tmp_path / "same"  # the source's own weights, as if fine-tuned for zero steps
    shutil.copytree(source, same)
    cfg = json.loads((same / "config.json").read_text())
    cfg["train"]["init_from"] = str(source)
    (same / "config.json").write_text(json.dumps(cfg))
    before, after, _, _ = before_after_samples(same, n_per_class=2)
    assert before.shape == (20, 8, 8, 1) and np.array_equal(before, after)  # same noise, weights

    tuned = tmp_path / "tuned"
    from difflab.ddpm.training import train

    train(tiny_config(init_from=str(source), epochs=0.2), tuned, device="cpu", progress=False)
    before, after, _, _ = before_after_samples(tuned, n_per_class=2)
    assert not np.array_equal(before, after)
    assert main(["plot", str(tuned), "--device", "cpu"]) == 0
    figure = Image.open(tuned / "figures" / "before_after.png")
    assert figure.width > figure.height / 2
    page = write_report([tuned], tmp_path / "r.html").html.read_text()
    assert f"Before and after: fine-tuned from {source}" in page


# -- layering -----------------------------------------------------------------------------------
def test_figures_import_no_lab_package():
    """figures/ is a drawing layer: besides itself it imports only the base modules."""
    import ast
    from pathlib import Path

    import difflab.figures

    allowed = {"difflab.errors", "difflab.files", "difflab.config"}
    found = {}
    for path in sorted(Path(difflab.figures.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports too
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue  # relative imports stay inside figures/
            for name in names:
                if name.split(".")[0] == "difflab":
                    found.setdefault(name, []).append(path.name)
    assert found, "the AST walk found no difflab import at all"
    bad = {
        n: f for n, f in found.items() if n not in allowed and not n.startswith("difflab.figures")
    }
    assert not bad, bad
