import os

# Set before torch starts OpenMP: with the default (spinning) wait policy, two threads on a
# two-core machine slow down ten-fold as soon as anything else runs beside the tests.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# what `--precision auto` means on a CPU is measured per machine; the tests pin it so that
# their images do not depend on the machine they run on (tests/test_sampling.py measures)
os.environ.setdefault("DIFFLAB_CPU_PRECISION", "fp32")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web UI over a lab with one tiny run, on loopback: (lab, url, client, secret file)."""
    pytest.importorskip("gradio")
    import gradio_client

    from difflab.ui import app as app_mod
    from difflab.ui.lab import Lab
    from helpers import tiny_run

    root = tmp_path_factory.mktemp("ui")
    runs = root / "runs"
    runs.mkdir()
    tiny_run(runs, "tiny")
    secret = root / "secret.txt"  # beside the runs folder: must never be served
    secret.write_text("not for the browser")
    lab = Lab(runs, root / "models", device="cpu")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio-cache"))  # outside the runs folder
        app = app_mod.serve(lab, "127.0.0.1", port, block=False)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        yield lab, f"http://127.0.0.1:{port}/", client, secret
        app.close()
