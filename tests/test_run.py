"""`kubetune run SPEC`: one machine, no cluster: collect from a URL list, then train and publish."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubetune.dev.testing.shapes import generate
from kubetune.dev.testing.specs import tiny_training


@pytest.fixture
def image_server() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Shape images over real HTTP on 127.0.0.1; yields (base URL, [(path, caption)])."""
    images = {f"/{s.name}.jpg": s for s in generate(12, size=96)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            image = images.get(self.path)
            if image is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image.jpeg)))
            self.end_headers()
            self.wfile.write(image.jpeg)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", [(path, image.caption) for path, image in images.items()]
    server.shutdown()


def run_locally(spec_file: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`kubetune run SPEC_FILE --storage OUT` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(spec_file), "--storage", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_run_collects_then_trains_to_a_loadable_model(
    tmp_path: Path, image_server: tuple[str, list[tuple[str, str]]]
) -> None:
    from kubetune.dev.testing.tiny_sd import build_tiny_pipeline

    base_url, items = image_server
    model = build_tiny_pipeline(tmp_path / "tiny-sd")
    url_list = tmp_path / "urls.jsonl"
    url_list.write_text(
        "".join(json.dumps({"url": base_url + path, "caption": caption}) + "\n" for path, caption in items)
    )
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local"},
        "spec": {
            "dataset": {"urls": {"uri": str(url_list)}, "resolution": 64, "minSize": 32, "allowPrivateNetwork": True},
            "model": {"base": str(model)},
            "training": tiny_training(
                gradientCheckpointing=False, validationPrompts=["a red circle on a white background"], seed=1
            ),
            "trainer": {"gpusPerNode": 0},
            "storage": {"uri": "s3://not-used-locally/run/"},
        },
    }
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"

    result = run_locally(spec_file, out)
    assert result.returncode == 0, result.stderr[-3000:]

    metadata = (out / "dataset" / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(metadata) == len(items)
    assert (out / "dataset" / "manifest.json").exists()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 4
    assert (out / "model_index.json").exists()
    assert list((out / "samples").rglob("*.png")), "validation samples were published"

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    image = pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    # A second run finds the dataset complete and the training finished: nothing is redone.
    again = run_locally(spec_file, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout + again.stderr


def test_run_rejects_a_bad_spec_in_one_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(
        "apiVersion: kubetune.dev/v1alpha1\nkind: FineTuneJob\nspec:\n  model: {base: x}\n  storage: {uri: s3://b/p/}\n"
        "  dataset: {urls: {uri: /x.jsonl}}\n  training: {mixedPrecision: no}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(spec_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "spec.training.mixedPrecision" in result.stderr


def test_the_local_example_runs_on_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    """`kubetune dev fixtures` then `kubetune run examples/local.yaml`, as the example's comment
    says, from a working folder of its own (the example's paths are relative to it)."""
    repo = Path(__file__).resolve().parents[1]
    kubetune = [sys.executable, "-m", "kubetune.cli"]
    fixtures = subprocess.run(
        [*kubetune, "dev", "fixtures", "--vae-steps", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert fixtures.returncode == 0, fixtures.stderr[-2000:]
    result = subprocess.run(
        [*kubetune, "run", str(repo / "examples" / "local.yaml"), "--storage", "runs/local"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "local"
    assert json.loads((out / "progress.json").read_text())["state"] == "succeeded"
    assert (out / "model_index.json").exists() and list((out / "samples").rglob("grid.png"))
