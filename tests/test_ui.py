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
        app_mod,
        "serve",
        lambda lab, host, port, auth, block, **kw: seen.update(host=host, auth=auth),
    )
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


# -- hardening: what the server serves, and to whom ---------------------------------------------
def test_uploads_are_never_served_inline(server):
    import httpx

    lab, url, _, _ = server
    page = b"<html><script>alert(document.cookie)</script></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    for name, body in (("evil.html", page), ("evil.svg", svg)):
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (name, body)}, timeout=60)
        path = Path(r.json()[0])
        assert path.read_bytes() == body
        assert lab.runs not in path.resolve().parents  # the upload cache is not served as runs
        got = httpx.get(f"{url}gradio_api/file={path}", timeout=60)
        kind = got.headers.get("content-type", "")
        assert "html" not in kind and "svg" not in kind, (name, kind)
        assert got.headers.get("content-disposition", "").startswith("attachment"), name
        assert got.headers.get("x-content-type-options") == "nosniff"


def test_the_upload_cache_is_cleared(tmp_path, monkeypatch):
    import httpx
    from conftest import free_port

    assert app_mod.build_app(Lab(tmp_path / "r", tmp_path / "m", "cpu")).delete_cache == app_mod.DELETE_CACHE  # fmt: skip
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    lab, port = Lab(tmp_path / "runs", tmp_path / "models", device="cpu"), free_port()
    app = app_mod.serve(lab, "127.0.0.1", port, block=False, delete_cache=(1, 1))
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": ("a.txt", b"x")}
        )
        path = Path(r.json()[0])
        assert path.exists()
        deadline = time.time() + 20
        while path.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert not path.exists()
    finally:
        app.close()


def test_requests_for_another_host_name_are_refused(server):
    import httpx

    from difflab.ui.server import Guard, allowed_hosts

    _, url, _, _ = server
    port = url.rstrip("/").rsplit(":", 1)[1]
    for host in ("rebind.example", f"rebind.example:{port}", "127.0.0.1.rebind.example", ""):
        r = httpx.get(url, headers={"Host": host}, timeout=30)
        assert r.status_code == 400, host
        assert "--allowed-host" in r.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url, headers={"Host": host}, timeout=30).status_code == 200, host
    guard = Guard(None, allowed_hosts("127.0.0.1", ["lab.example.org"]), False, Path("/tmp"))
    assert guard.host_ok("lab.example.org:7860") and guard.host_ok("lab.example.org.")
    assert not guard.host_ok("192.168.1.5") and not guard.host_ok("example.org")
    wild = Guard(None, allowed_hosts("0.0.0.0"), True, Path("/tmp"))
    assert wild.host_ok("192.168.1.5:7860") and wild.host_ok("[fe80::1]:7860")
    assert not wild.host_ok("rebind.example")


def test_training_state_locks_and_hidden_files_are_never_served(server):
    lab, url, _, _ = server
    run = lab.runs / "tiny"
    (run / ".lock").write_text("123\n")
    (run / ".hidden").mkdir(exist_ok=True)
    (run / ".hidden" / "x.png").write_bytes(b"\x89PNG")
    (run / "link.png").symlink_to(run / "train_state.pt")
    for name in ("train_state.pt", ".lock", ".hidden/x.png", "link.png"):
        assert (run / name).exists()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={run / name}").read()
        assert e.value.code == 403, name
    (run / "link.png").unlink()
    with urllib.request.urlopen(f"{url}gradio_api/file={run / 'model.safetensors'}") as r:
        assert r.status == 200


def test_unsafe_runs_folders_are_refused(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(app_mod, "serve", lambda lab, *a, **kw: seen.update(runs=lab.runs))
    home = tmp_path / "home"
    (home / "code" / "repo" / ".git").mkdir(parents=True)
    (home / ".ssh").mkdir()
    monkeypatch.setenv("HOME", str(home))
    cases = {
        "/": "root of the file system", "~": "home folder", str(tmp_path): "home folder",
        str(home / "code"): "repo/.git", str(home / "code" / "repo"): "holds .git",
        str(home / ".ssh"): "inside a .git or .ssh folder",
    }  # fmt: skip
    for runs_dir, why in cases.items():
        assert main(["ui", "--runs-dir", runs_dir, "--device", "cpu"]) == 2, runs_dir
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and "--allow-unsafe-runs-dir" in err
    assert not seen
    forced = ["ui", "--runs-dir", str(home / "code"), "--allow-unsafe-runs-dir", "--device", "cpu"]
    assert main(forced) == 0 and seen["runs"] == (home / "code").resolve()
    assert main(["ui", "--runs-dir", str(home / "code" / "runs"), "--device", "cpu"]) == 0


def test_auth_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(
        app_mod, "serve", lambda lab, host, port, auth, block, **kw: seen.update(auth=auth, **kw)
    )
    args = ["ui", "--host", "0.0.0.0", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]
    secret = tmp_path / "auth"
    secret.write_text("ann:s3cret\n")
    assert main([*args, "--auth-file", str(secret), "--allowed-host", "lab.example"]) == 0
    assert seen == {"auth": ("ann", "s3cret"), "allowed_hosts": ("lab.example",)}
    monkeypatch.setenv("DIFFLAB_UI_AUTH", "bob:pw")
    assert main(args) == 0 and seen["auth"] == ("bob", "pw")
    capsys.readouterr()
    secret.write_text("ann:s3cret\nsecond line\n")
    monkeypatch.delenv("DIFFLAB_UI_AUTH")
    for bad, option in ((["--auth-file", str(secret)], "--auth-file"),
                        (["--auth-file", str(tmp_path / "none")], "no such file"),
                        (["--no-auth", "--allowed-host", "a/b"], "--allowed-host")):  # fmt: skip
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and "s3cret" not in err


# -- hardening: caps, cancel, bounded memory ----------------------------------------------------
@pytest.fixture
def lab(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    tiny_run(runs, "tiny")
    return Lab(runs, tmp_path / "models", device="cpu", jobs=JobQueue())


def test_caps_give_one_line(lab):
    from difflab.ui.tabs import sd, train

    cases = [
        (lambda: sd.start_sd(lab, "a cat", n=17), "images 17: the web UI takes at most 16"),
        (lambda: sd.start_sd(lab, "a cat", steps=151), "steps 151: the web UI takes at most 150"),
        (lambda: sd.start_sd(lab, "a cat", size="65536x65536"), "at most 4096"),
        (lambda: sd.start_sd(lab, "a cat", size="2048x512"), "at most 1,024"),
        (
            lambda: sd.start_sd_sweep(
                lab, "a\nb\nc", "x", guidance="1,2,3,4,5,6,7,8,9", steps="1,2,3,4"
            ),
            "cells (prompts x guidance x steps x seeds) 324",
        ),  # fmt: skip
        (lambda: sd.start_sd_sweep(lab, "/etc/prompts.txt", "x"), "not a file"),
        (
            lambda: sweep.start_sweep(
                lab, "tiny", "x", guidance=",".join(map(str, range(30))), steps="1,2,3,4,5,6,7"
            ),
            "cells (guidance x steps x samplers x seeds) 210",
        ),  # fmt: skip
        (
            lambda: sweep.start_sweep(lab, "tiny", "x", n_per_class=101),
            "samples per class per cell 101",
        ),  # fmt: skip
        (
            lambda: train.start_training(lab, "n", minutes=float("nan")),
            "minutes nan: must be a finite number",
        ),  # fmt: skip
        (
            lambda: train.start_training(lab, "n", minutes=float("inf")),
            "minutes inf: must be a finite number",
        ),  # fmt: skip
        (lambda: train.start_training(lab, "n", minutes=1e6), "the web UI takes at most 1440"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError) as e:
            call()
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert lab.jobs.jobs() == []
    assert not (lab.runs / "n").exists() and not (lab.runs / "sweeps" / "x").exists()


def test_stable_diffusion_generation_stops_between_steps(lab, monkeypatch):
    from difflab.sd.tiny import build_tiny_sd
    from difflab.ui import jobs as jobs_mod
    from difflab.ui.tabs import sd

    model = build_tiny_sd(lab.models / "tiny-sd")
    real = jobs_mod.Job.update

    def update(job, progress=None, message=None, preview=None):
        real(job, progress, message, preview)
        if message == "step 2/4":  # two images in one call of four steps: cancel mid-image
            job.cancel()

    monkeypatch.setattr(jobs_mod.Job, "update", update)
    job = sd.start_sd(lab, "a cat", steps=4, n=2, size="64x64", model=str(model))
    assert job.wait(120) and job.state == "cancelled", job.status_line()
    assert job.progress == 2 / 4  # one call of two images: 4 steps, stopped after step 2
    assert not list((lab.runs / "sd").rglob("*.png"))  # nothing written


def test_finished_jobs_keep_little(lab, monkeypatch):
    from difflab.ui import limits
    from difflab.ui.jobs import KEEP

    monkeypatch.setattr(limits, "REVERSE_FRAMES", 10)
    job = processes.start_reverse(lab, "tiny", "1,2", steps=None, sampler="ddpm")  # all T = 100
    assert job.wait(120) and job.state == "done", job.status_line()
    frames = job.result
    assert len(frames) <= 10 and frames[0]["index"] == 0 and frames[-1]["t"] == 0
    assert frames[-1]["index"] == 100 and sum(f["x_t"].nbytes + f["x0"].nbytes for f in frames) < 2**20  # fmt: skip
    assert job.work is None and job.preview is None
    for i in range(KEEP + 5):
        lab.jobs.submit("test", str(i), lambda j: j.update(None, "", np.zeros((100, 100)))).wait(10)
    assert len(lab.jobs.jobs()) == KEEP
    assert all(j.work is None and j.preview is None for j in lab.jobs.jobs())


def test_a_key_is_queued_once_however_fast_the_clicks(lab):
    import threading

    from difflab.ui.tabs import train

    release = threading.Event()
    blocker = lab.jobs.submit("test", "blocker", lambda j: release.wait(60))
    barrier, results = threading.Barrier(8), []

    def click():
        barrier.wait()
        try:
            results.append(train.start_training(lab, "twice", "digits", "quick", 0.05))
        except UsageError as e:
            results.append(str(e))

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = [r for r in results if not isinstance(r, str)]
    assert len(queued) == 1 and all("already queued" in r for r in results if isinstance(r, str))
    # the queued training takes the run folder's lock: here another writer holds it
    from difflab.files import folder_lock

    (lab.runs / "twice").mkdir()
    with folder_lock(lab.runs / "twice"):
        release.set()
        assert blocker.wait(30) and queued[0].wait(60)
        assert queued[0].state == "failed" and "another process" in queued[0].error
        # `difflab train` takes the same lock
        args = ["train", "--dataset", "digits", "--epochs", "0.01", "--device", "cpu"]
        assert main([*args, "--out", str(lab.runs / "twice")]) == 2
    assert sorted(p.name for p in (lab.runs / "twice").iterdir()) == [".lock"]  # nothing written


# -- hardening: broken folders, confined models --------------------------------------------------
def test_a_broken_run_folder_breaks_neither_the_table_nor_the_page(lab, capsys):
    import shutil

    from difflab.ui.tabs import runs as runs_tab

    for name, config in (("bad-bytes", b"\xff\xfe{"), ("bad-json", b'{"train": ')):
        shutil.copytree(lab.runs / "tiny", lab.runs / name)
        (lab.runs / name / "config.json").write_bytes(config)
    (lab.runs / "bad-json" / "metrics.jsonl").write_bytes(b"\xff\n[1]\n")
    rows = {r["run"]: r for r in runs_tab.runs_table(lab)}
    assert rows["tiny"]["dataset"] == "digits"
    assert rows["bad-bytes"]["dataset"] == "broken: config.json: not UTF-8 text"
    assert rows["bad-json"]["dataset"].startswith("broken: config.json: not valid JSON")
    with pytest.raises(UsageError, match="not UTF-8"):
        runs_tab.run_details(lab, "bad-bytes")
    page = app_mod.build_app(lab)
    for fn in page.fns.values():  # what a page load runs: nothing raises
        if any(event == "load" for _, event in fn.targets):
            fn.fn()


def test_models_typed_in_the_page_stay_in_the_models_folder_and_the_hub_cache(lab, tmp_path, monkeypatch):  # fmt: skip
    from huggingface_hub import constants

    from difflab.ui.tabs import models as models_tab
    from difflab.ui.tabs import sd

    (lab.models / "mine").mkdir(parents=True)
    (lab.models / "out").symlink_to(tmp_path)
    cache = tmp_path / "hub"
    snap = cache / "models--org--cached" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert lab.model("mine") == str(lab.models / "mine")
    assert lab.model(str(lab.models / "mine")) == str(lab.models / "mine")
    assert lab.model("org/cached") == str(snap)
    for bad in ("/etc", "../runs", "out", "out/runs", "org/not-cached", "~"):
        with pytest.raises(UsageError, match="--allow-any-model"):
            lab.model(bad)
    with pytest.raises(UsageError, match="--allow-any-model"):
        sd.start_sd(lab, "a cat", model="/etc")
    with pytest.raises(UsageError, match="CLIP model 'openai/clip-vit-large-patch14'"):
        sd.start_sd_sweep(lab, "a cat", "x", model="mine")  # the default CLIP model: not cached
    with pytest.raises(UsageError, match="--allow-any-model"):
        models_tab.import_file(lab, "/etc/passwd")
    lab.allow_any_model = True
    assert lab.model("/etc") == "/etc"
    with pytest.raises(UsageError, match="only .safetensors"):
        models_tab.import_file(lab, "/etc/passwd")


# -- defaults: the UI's are the command line's ---------------------------------------------------
def test_the_ui_defaults_are_the_command_lines(tmp_path):
    """For every action the page and the command line share, the options object the page
    builds from its untouched widgets is the one the command line builds with no options."""
    from dataclasses import replace

    from difflab.cli import build_parser
    from difflab.cli.args import build
    from difflab.options import (
        DDPMSweepAxes,
        ForwardOptions,
        ReverseOptions,
        SampleOptions,
        SDGeneration,
        SDPipelineSpec,
        SDSweepAxes,
    )  # fmt: skip
    from difflab.ui.tabs import sample, sd

    def cli(cls, *argv, **dests):
        return build(cls, build_parser().parse_args(list(argv)), **dests)

    page = app_mod.build_app(Lab(tmp_path / "runs", tmp_path / "models", device="cpu"))
    values = {
        fn.api_name: [c.value for c in fn.inputs]
        for fn in page.fns.values()
        if fn.api_name in ("sample", "reverse", "forward_t", "sweep", "sd_generate", "sd_sweep")
    }
    out = ["--out", str(tmp_path / "x.png")]
    assert sample.sample_options(*values["sample"][1:]) == cli(SampleOptions, "sample", "R", *out)
    assert processes.reverse_options(*values["reverse"][1:]) == cli(ReverseOptions, "reverse", "R", *out)  # fmt: skip
    forward = cli(ForwardOptions, "forward", *out)  # no run: the figure noises mnist5k
    assert processes.forward_options(*values["forward_t"]) == replace(forward, dataset="mnist5k")
    axes = cli(DDPMSweepAxes, "sweep", "R", *out, samplers="sampler", n_per_class="n")
    assert sweep.sweep_axes(*values["sweep"][2:]) == axes
    prompt, neg, *gen, scheduler, model, safety = values["sd_generate"]
    args = ("sd", "generate", "--prompt", "a cat", *out)
    assert sd.generation("a cat", neg, *gen) == cli(SDGeneration, *args)
    spec = cli(SDPipelineSpec, *args)
    assert (scheduler or None, model, safety) == (spec.scheduler, spec.model, spec.safety_checker)
    _, _, *axes, model, clip = values["sd_sweep"]
    args = ("sd", "sweep", "--prompts", "a cat", *out)
    assert sd.sweep_axes("a cat", *axes, clip) == cli(SDSweepAxes, *args)
    assert model == cli(SDPipelineSpec, *args).model
    assert sample.sample_options(*values["sample"][1:]) == SampleOptions()  # and the classes'
    assert sd.generation("a cat", neg, *gen) == SDGeneration(prompt="a cat")


def test_the_train_tab_shows_quality_while_training(lab, tmp_path, monkeypatch):
    from difflab.ui.tabs import train

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    for bad, message in ((-1, "must be a number >= 0"), (1.5, "whole number"), ("x", "expected a number")):  # fmt: skip
        with pytest.raises(UsageError) as e:
            train.start_training(lab, "q", "digits", "quick", 0.05, eval_every=bad)
        assert str(e.value).startswith("evaluate every (steps)") and message in str(e.value)
        assert len(str(e.value).splitlines()) == 1
    assert (
        train.quality_rows(lab.runs / "tiny") == [] and train.latest_grid(lab.runs / "tiny") is None
    )
    job = train.start_training(lab, "q", "digits", "quick", 0.05, eval_every=10)
    assert job.wait(240) and job.state == "done", job.status_line()
    run = lab.runs / "q"
    rows = train.quality_rows(run)
    assert rows and all(r["step"] % 10 == 0 for r in rows[:-1])
    accuracy, ratio = train.quality_plots(rows, 32)
    assert list(accuracy.columns) == ["images seen", "accuracy (%)"] and len(accuracy) == len(rows)
    assert ratio["FD / floor"].tolist() == [r["eval"]["fd_ratio"] for r in rows]
    assert train.latest_grid(run).endswith(f"step-{rows[-1]['step']:07d}.png")
    assert (run / "figures" / "quality.png").is_file()  # the Runs tab's figures


def test_stable_diffusion_tab_on_a_mini_sd_folder(server):
    """A mini-SD folder of the models folder: an empty size box gives its own 16x16, and the
    notes carry its prompt accuracy; the sweep's table has prompt accuracy and diversity."""
    from PIL import Image

    from difflab.cli import main
    from difflab.ui.tabs import sd

    lab, _, client, _ = server
    model = lab.models / "mini"
    lab.models.mkdir(parents=True, exist_ok=True)
    assert main(["sd", "mini", "--dataset", "digits", "--preset", "tiny", "--out", str(model)]) == 0
    assert sd.size_hint(lab, str(model)) == "16x16 (the model's own)"
    assert str(model) in [m.path for m in list_models(lab.models, hf_cache=False)]
    status, gallery, notes, settings = client.predict(
        "a handwritten digit 3", "", 3, 2, 0, 2, "", "", str(model), True, api_name="/sd_generate"
    )  # fmt: skip
    assert len(gallery) == 2 and (settings["width"], settings["height"]) == (16, 16)
    assert Image.open(gallery[0]["image"]).size == (16, 16)
    assert "prompt accuracy" in notes and "digits reference classifier" in notes
    assert settings["prompt_accuracy"] in (0.0, 0.5, 1.0)
    status, table, grids = client.predict(
        "a handwritten digit 3", "mini1", "1,3", "1", "0,1", "", str(model), "none",
        api_name="/sd_sweep",
    )  # fmt: skip
    assert "4/4 cells" in status
    assert "prompt_accuracy_mean" in table["headers"] and "diversity_mean" in table["headers"]
