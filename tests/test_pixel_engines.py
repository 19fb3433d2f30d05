"""The torch-free test engines keep their word: real images of the asked size and format, the same
bytes for the same request, every step reported, and a gate that holds a job until the test opens it."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from kolors_api.schema import GenerateParams
from tests.pixel_engines import Gate, gate, pixels


def test_pixels_makes_images_of_the_asked_size_and_format_the_same_for_the_same_request() -> None:
    engine = pixels(None)
    params = GenerateParams(prompt="a fox", seed=7, steps=3, width=512, height=768, number_of_images=2,
                            output_format="png")
    steps: list[tuple[int, int, bytes]] = []
    out = engine.generate(params, lambda step, total, preview=None: steps.append((step, total, preview())))
    assert out.seeds == [7, 8] and len(out.images) == 2 and out.images[0] != out.images[1]
    for data in out.images:
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ("PNG", (512, 768))
    assert [(s, t) for s, t, _ in steps] == [(1, 3), (2, 3), (3, 3)]
    assert len({p for *_, p in steps}) == 3  # a new preview at each step
    assert engine.generate(params).images == out.images
    assert engine.generate(GenerateParams(prompt="a fox", seed=9, steps=3, width=512, height=768,
                                          output_format="png")).images[0] != out.images[0]


def test_the_gate_holds_a_job_after_its_step_until_the_test_opens_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    held = Gate(tmp_path / "gate")
    monkeypatch.setenv("KOLORS_TEST_GATE_DIR", str(held.dir))
    engine = gate(None)
    steps: list[int] = []
    job = threading.Thread(target=engine.generate, args=(GenerateParams(prompt="a fox hold:one", steps=4),
                                                         lambda step, total, preview=None: steps.append(step)))
    job.start()
    held.wait_held("one")
    job.join(0.2)
    assert job.is_alive() and steps == [1]  # held after step 1
    held.open("one")
    job.join(30)
    assert not job.is_alive() and steps == [1, 2, 3, 4]


def test_the_pixel_engines_and_the_worker_that_loads_them_import_no_torch() -> None:
    code = ("import sys; import tests.pixel_engines, kolors_api.worker.make; "
            "sys.exit(sorted({'torch', 'diffusers'} & set(sys.modules)) or 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
