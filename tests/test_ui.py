"""The web UI: a real server on 127.0.0.1 driven through gradio_client, and its rules."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.errors import UsageError
from helpers import tiny_run

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from difflab.ui import app as app_mod  # noqa: E402
from difflab.ui.jobs import JobQueue  # noqa: E402
from difflab.ui.lab import Lab  # noqa: E402
from difflab.ui.paths import import_model, inside, list_models  # noqa: E402
from difflab.ui.tabs import processes, sweep  # noqa: E402


# -- paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../secret.txt", "a/../../secret.txt", "%2e%2e/secret.txt", "%252e%252e%252fsecret.txt",
        "..%2fsecret.txt", "..\\secret.txt", "/etc/passwd", "C:\\Windows", "", "a\x00b",
    ],
)  # fmt: skip
def test_inside_refuses_every_spelling_of_outside(tmp_path, name):
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(UsageError, match="run "):
        inside(root, name, "run")


def test_inside_accepts_paths_in_the_root_and_refuses_symlinks_out(tmp_path):
    root = tmp_path / "runs"
    (root / "a" / "b").mkdir(parents=True)
    assert inside(root, "a/b") == (root / "a" / "b").resolve()
    assert inside(root, str(root / "a")) == (root / "a").resolve()  # absolute, but inside
    assert inside(root, "a/./b/../b") == (root / "a" / "b").resolve()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="outside the runs folder"):
        inside(root, "link/secret.txt")


def test_server_refuses_files_outside_the_runs_folder(server):
    lab, url, _, secret = server
    inside_file = lab.runs / "tiny" / "config.json"
    with urllib.request.urlopen(f"{url}gradio_api/file={inside_file}") as r:
        assert r.status == 200 and json.loads(r.read())["preset"] == "test"
    rel = Path("..") / secret.name
    attempts = [
        str(secret), f"{lab.runs}/../{secret.name}", f"{lab.runs}/%2e%2e/{secret.name}",
        f"{lab.runs}%2F..%2F{secret.name}", str(rel), "%2e%2e/" + secret.name, "/etc/passwd",
        f"{lab.runs}/tiny/../../{secret.name}",
    ]  # fmt: skip
    for attempt in attempts:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={attempt}").read()
        assert e.value.code in (403, 404), attempt


def test_names_from_the_browser_stay_inside(server):
    lab, _, client, _ = server
    for bad in ("../escape", "%2e%2e/escape", "/tmp/escape", ".hidden"):
        with pytest.raises(Exception) as e:
            client.predict("tiny", bad, "0", "2", "ddim", "0", 2, api_name="/sweep")
        msg = str(e.value)
        assert "sweep name" in msg and "Traceback" not in msg
    assert not (lab.runs.parent / "escape").exists()
    assert not Path("/tmp/escape").exists()


# -- binding -------------------------------------------------------------------------------------
def test_default_bind_is_loopback_and_public_needs_auth(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(
        app_mod, "serve", lambda lab, host, port, auth, block: seen.update(host=host, auth=auth)
    )
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "runs" / ".ui-cache"))
    runs = ["--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(["ui", *runs]) == 0
    assert seen["host"] == "127.0.0.1" and seen["auth"] is None
    assert main(["ui", "--host", "0.0.0.0", *runs]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--auth USER:PASSWORD" in err
    assert main(["ui", "--host", "0.0.0.0", "--auth", "ann:s3cret", *runs]) == 0
    assert seen == {"host": "0.0.0.0", "auth": ("ann", "s3cret")}
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0", "--auth", "nopassword", *runs]) == 2
    assert main(["ui", "--host", "0.0.0.0", "--no-auth", *runs]) == 0
    assert seen["auth"] is None
    capsys.readouterr()
    for bad, option in (
        (["--port", "0"], "--port 0"),
        (["--runs-dir", "/proc/no/runs"], "--runs-dir"),
    ):
        assert main(["ui", *runs, *bad]) == 2
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and option in captured.err
        assert "http://" not in captured.out  # nothing announced for a server that never ran


# -- the tabs through gradio_client ------------------------------------------------------------
def test_sample_gives_grid_npz_and_the_command(server):
    lab, _, client, _ = server
    status, image, png, npz, command = client.predict(
        "tiny", "0,3", 2, 2.0, 4, "ddim", 1, api_name="/sample"
    )
    assert "done" in status
    grid = Image.open(png)
    assert grid.width > 2 * 8 and grid.height > 2 * 8
    arrays = np.load(npz)
    assert arrays["images"].shape == (4, 8, 8, 1) and list(arrays["labels"]) == [0, 0, 3, 3]
    assert command.startswith("difflab sample ") and "--classes 0,3" in command
    # the command line gives the same images
    out = Path(command.split("--out ")[1])
    again = out.with_name("again.npz")
    assert main([*command.split()[1:-2], "--out", str(again), "--device", "cpu"]) == 0
    assert np.array_equal(np.load(again)["images"], arrays["images"])


def test_errors_are_one_line_without_traceback(server):
    _, _, client, _ = server
    with pytest.raises(Exception) as e:
        client.predict("tiny", "0,42", 2, 2.0, 4, "ddim", 1, api_name="/sample")
    msg = str(e.value)
    assert "out of range" in msg and "Traceback" not in msg and len(msg.splitlines()) == 1


def test_training_queue_stop_and_resume(server):
    """Two trainings never run at once; Stop leaves a consistent run that resumes."""
    lab, _, client, _ = server
    client.predict("t1", "digits", "quick", 0.15, 0, False, api_name="/train")
    client.predict("t2", "digits", "quick", 0.05, 0, False, api_name="/train")
    first, second = lab.jobs.jobs()[1], lab.jobs.jobs()[0]
    assert (first.title, second.title) == ("t1", "t2")
    with pytest.raises(Exception, match="already"):  # the same run twice
        client.predict("t1", "digits", "quick", 0.1, 0, False, api_name="/train")
    while first.state != "running":
        time.sleep(0.05)
    assert second.state == "queued"  # waits for the device instead of fighting for it
    time.sleep(1.0)
    assert "Stopping t1" in client.predict("t1", api_name="/stop_training")
    assert first.wait(60) and first.state == "cancelled"
    run = lab.runs / "t1"
    assert {"config.json", "model.safetensors", "train_state.pt"} <= {p.name for p in run.iterdir()}
    assert second.wait(60) and second.state == "done"
    assert second.started >= first.finished  # one after the other

    # resume from the UI: continues from the saved step
    def saved_step() -> int:
        return torch.load(run / "train_state.pt", weights_only=True)["step"]

    steps_before = saved_step()
    assert steps_before > 0
    client.predict("t1", "digits", "quick", 0.15, 0, True, api_name="/train")
    resumed = lab.jobs.jobs()[0]
    assert resumed.wait(60) and resumed.state == "done", resumed.status_line()
    assert saved_step() > steps_before
    names = [r[0] for r in client.predict(None, api_name="/runs")[0]["data"]]
    assert {"tiny", "t1", "t2"} <= set(names)


def test_processes_forward_and_reverse(server):
    lab, _, client, _ = server
    image, note = client.predict("tiny", 50, api_name="/forward")
    assert "T = 100" in note and "t = 50" in note
    assert Image.open(image).width > 0
    img0, _ = processes.forward_view(lab, "tiny", 0)
    imgT, _ = processes.forward_view(lab, "tiny", 100)
    assert img0.std() > 0 and not np.array_equal(img0, imgT)
    job = processes.start_reverse(lab, "tiny", 2, 2.0, 5, "ddim")
    assert job.wait(60) and job.state == "done"
    frames = job.result
    assert [f["t"] for f in frames][-1] == 0 and len(frames) == 6
    assert frames[0]["x_t"].shape == frames[-1]["x0"].shape


def test_sweep_tab_runs_a_sweep_and_writes_the_report(server):
    lab, _, client, _ = server
    status, table, grids, plots = client.predict(
        "tiny", "s1", "0,2", "2", "ddim", "0", 2, api_name="/sweep"
    )
    assert "done" in status and "2/2 cells" in status
    assert [r[:2] for r in table["data"]] == [["ddim", 2], ["ddim", 2]]
    assert grids and plots
    report, link = client.predict("s1", api_name="/sweep_report")
    assert "data:image/png;base64," in Path(report).read_text()
    target = link.split("](/")[1].rstrip(")")
    with urllib.request.urlopen(server[1] + target) as r:  # the link opens the report
        assert r.status == 200 and b"<html" in r.read()


def test_uploads_are_capped(server):
    _, url, _, _ = server
    import httpx

    big = b"x" * (21 * 2**20)
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", big)}, timeout=60)
    assert r.status_code == 413, r.status_code
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("s.bin", b"ok")}, timeout=60)
    assert small.status_code == 200


def test_jobs_cancel_between_cells(tmp_path):
    """A cancelled sweep keeps the finished cells and a consistent table."""
    runs = tmp_path / "runs"
    runs.mkdir()
    tiny_run(runs, "tiny")
    lab = Lab(runs, tmp_path / "models", device="cpu", jobs=JobQueue())
    import difflab.experiments.ddpm_sweep as sweep_mod

    real = sweep_mod.sample_cells
    job_box = []

    def cancel_after_first(*a, **k):
        out = real(*a, **k)
        job_box[0].cancel()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "sample_cells", cancel_after_first)
        job = sweep.start_sweep(lab, "tiny", "c", "0", "2,3", "ddim", "0", 2)
        job_box.append(job)
        assert job.wait(120)
    assert job.state == "cancelled"
    doc = json.loads((runs / "sweeps" / "c" / "metrics.json").read_text())
    assert doc["cells_done"] == 1 and not doc["complete"]


def test_stable_diffusion_tab_marks_filtered_images(server, tmp_path):
    from difflab.sd.tiny import build_tiny_sd

    lab, _, client, _ = server
    model = build_tiny_sd(lab.models / "tiny-flags", flags=True)
    status, gallery, notes, settings = client.predict(
        "a cat", "", 7.5, 2, 0, 2, "64x64", "", str(model), True, api_name="/sd_generate"
    )
    assert "2 FILTERED by the safety checker" in status
    assert len(gallery) == 2 and all(
        "FILTERED by the safety checker" in g["caption"] for g in gallery
    )
    assert notes.count("FILTERED by the safety checker") == 2 and "seed 1" in notes
    assert settings["guidance"] == 7.5 and settings["safety_checker"] is True
    names = {m.name for m in list_models(lab.models, hf_cache=False)}
    assert "tiny-flags" in names


def test_models_listing_and_import(tmp_path):
    import torch
    from safetensors.torch import save_file

    models = tmp_path / "models"
    src = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(2)}, src)
    dest = import_model(src, models)
    assert dest.read_bytes() == src.read_bytes()
    entries = list_models(models, hf_cache=False)
    assert [(e.name, e.kind) for e in entries] == [("mine.safetensors", "single file")]
    with pytest.raises(UsageError, match="already exists"):
        import_model(src, models)
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"pickle")
    with pytest.raises(UsageError, match="only .safetensors"):
        import_model(bad, models)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a readable safetensors"):
        import_model(broken, models)


def test_stable_diffusion_sweep_tab_and_its_report(server):
    from difflab.sd.tiny import build_tiny_sd

    lab, _, client, _ = server
    model = build_tiny_sd(lab.models / "tiny-sd")
    status, table, grids = client.predict(
        "a red cube\na blue ball", "sd1", "1,3", "1", "0", "64x64", str(model), "none",
        api_name="/sd_sweep",
    )  # fmt: skip
    assert "4/4 cells" in status and "0 filtered" in status
    assert [row[:2] for row in table["data"]] == [[1, 1], [1, 3]]  # steps, guidance
    assert len(grids) == 3  # one grid per prompt and the curves
    report, _ = client.predict("sd1", api_name="/sd_sweep_report")
    page = Path(report).read_text()
    assert "Stable Diffusion sweep: sd1" in page and "a blue ball" in page
