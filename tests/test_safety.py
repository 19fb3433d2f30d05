"""Content safety: prompt screening, NudeNet on real images, and blocks end to end (FAILED, refund, no image)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFilter

from kolors_api.schema import GenerateParams
from kolors_api.settings import Settings
from kolors_api.worker.safety import (
    DEFAULT_BLOCKED_TERMS,
    NUDENET_CLASSES,
    NudeNetScreener,
    PromptScreen,
    Safety,
    build_safety,
    normalize,
)

from .conftest import ADMIN_KEY, LiveServer, redis_db_url, start_process, start_server
from .pixel_engines import serving

# -- pictures NudeNet really sees: a drawn (clothed) face, which it reports as FACE_FEMALE, and a wall


def drawn_face(fmt: str = "PNG", size: int = 512) -> bytes:
    im = Image.new("RGB", (size, size), (90, 120, 160))
    d = ImageDraw.Draw(im)

    def box(*xy: float) -> list[float]:
        return [v * size / 512 for v in xy]

    hair, skin = (60, 40, 20), (235, 190, 160)
    d.ellipse(box(150, 70, 362, 330), fill=hair)
    d.rectangle(box(150, 200, 362, 420), fill=hair)
    d.ellipse(box(170, 100, 342, 340), fill=skin)
    d.rectangle(box(225, 320, 287, 400), fill=skin)
    d.ellipse(box(120, 390, 392, 560), fill=(200, 60, 60))
    for x in (215, 297):
        d.ellipse(box(x - 20, 190, x + 20, 215), fill=(255, 255, 255))
        d.ellipse(box(x - 9, 193, x + 9, 212), fill=(70, 50, 30))
        d.arc(box(x - 25, 170, x + 25, 190), 200, 340, fill=hair, width=5)
    d.line(box(256, 210, 248, 260, 262, 262), fill=(200, 150, 120), width=4)
    d.chord(box(225, 275, 287, 305), 0, 180, fill=(190, 60, 70))
    return encode(im.filter(ImageFilter.GaussianBlur(2)), fmt)


def plain_wall(fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (512, 512), (180, 170, 150)), fmt)


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format={"JPG": "JPEG"}.get(fmt.upper(), fmt.upper()), quality=80)
    return buf.getvalue()


def params(prompt: str, **extra: Any) -> GenerateParams:
    return GenerateParams.from_dict({"prompt": prompt, **extra})


# -- prompt screening


@pytest.mark.parametrize("prompt", [
    "loli", "a LOLI girl", "ＬＯＬＩ",  # case-folded; full-width folded by NFKC
    "lo\u200bli", "lo\u00adli",  # zero-width space, soft hyphen
    "child-porn", "CHILD_PORNOGRAPHY", "child\n porn",  # separators between words, a `*` prefix term
    "pedophiles", "一个loli女孩", "一个恋童癖",  # Latin next to Chinese; a Chinese term inside a sentence
])
def test_default_list_blocks_obfuscated_terms(prompt: str) -> None:
    reason = PromptScreen(DEFAULT_BLOCKED_TERMS).check(prompt)
    assert reason is not None and reason.startswith("prompt contains a blocked term: ")


@pytest.mark.parametrize("prompt", [
    "a red fox in the snow", "a lollipop", "a pedometer on a desk", "Shotaro Kaneda's motorbike",
    "children playing in a park", "一只猫",
])
def test_default_list_leaves_ordinary_prompts_alone(prompt: str) -> None:
    assert PromptScreen(DEFAULT_BLOCKED_TERMS).check(prompt) is None


def test_terms_match_on_word_boundaries_only() -> None:
    screen = PromptScreen(["ass", "c.p.", "🍆"])
    for clean in ("a classic assassin", "bass guitar", "cpu cooler", "a_ssh"):
        assert screen.check(clean) is None, clean
    assert screen.match("kick-ass") == "ass"
    assert screen.match("ASS!") == "ass"
    assert screen.match("ａｓｓ hat") == "ass"
    assert screen.match("my c p") == "c.p."
    assert screen.match("an eggplant🍆") == "🍆"


def test_reason_names_the_configured_term_not_the_prompt() -> None:
    reason = PromptScreen(["Forbidden Fruit"]).check("A painting of ＦＯＲＢＩＤＤＥＮ　fruit, oil on canvas")
    assert reason == 'prompt contains a blocked term: "forbidden fruit"'


def test_normalize_folds_width_case_and_invisible_characters() -> None:
    assert normalize("ＳＴＲＡＳＳＥ Straße\u200d") == "strasse strasse"


def test_only_the_prompt_is_screened_not_the_negative_prompt() -> None:
    safety = Safety(PromptScreen(["gore"]))
    assert safety.check_prompt(params("a calm lake", negative_prompt="gore, blood")) is None
    assert safety.check_prompt(params("a calm lake, gore")) == 'prompt contains a blocked term: "gore"'


def test_terms_file_replaces_the_default_list(tmp_path: Path) -> None:
    terms = tmp_path / "blocked.txt"
    terms.write_text("# house rules\n\n  Forbidden Fruit  \n# loli is not listed here\nspoiler*\n", encoding="utf-8")
    safety = build_safety(Settings(blocked_terms_file=terms))
    assert safety.prompt is not None and safety.prompt.terms == ["forbidden fruit", "spoiler*"]
    assert safety.check_prompt(params("loli")) is None
    assert safety.check_prompt(params("no spoilers please")) == 'prompt contains a blocked term: "spoiler*"'
    assert safety.screeners == []


def test_default_settings_screen_prompts_with_the_default_list_and_no_screeners() -> None:
    safety = build_safety(Settings())
    assert safety.prompt is not None and safety.prompt.terms == list(DEFAULT_BLOCKED_TERMS)
    assert safety.screeners == []
    assert safety.check_images([b"not even an image"]) is None


def test_settings_read_the_safety_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KOLORS_API_BLOCKED_TERMS_FILE", str(tmp_path / "t.txt"))
    monkeypatch.setenv("KOLORS_API_SCREENERS", "nudenet")
    monkeypatch.setenv("KOLORS_API_NUDENET_CLASSES", "FACE_FEMALE")
    monkeypatch.setenv("KOLORS_API_NUDENET_THRESHOLD", "0.4")
    s = Settings()
    assert (s.blocked_terms_file, s.screeners, s.nudenet_classes, s.nudenet_threshold) == \
        (tmp_path / "t.txt", "nudenet", "FACE_FEMALE", 0.4)


@pytest.mark.parametrize(("settings", "message"), [
    (lambda tmp: Settings(blocked_terms_file=tmp / "missing.txt"), "blocked_terms_file: cannot read"),
    (lambda tmp: Settings(screeners="nudenet,clip"), "screeners: unknown clip (known: nudenet)"),
    (lambda tmp: Settings(screeners="nudenet", nudenet_classes="FACE_FEMALE,NAKED"), "nudenet_classes: unknown NAKED"),
    (lambda tmp: Settings(screeners="nudenet", nudenet_classes=" , "), "nudenet_classes: empty"),
])
def test_bad_safety_settings_fail_at_start_up(settings: Callable[[Path], Settings], message: str,
                                              tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_safety(settings(tmp_path))


def test_nudenet_without_the_safety_extra_fails_at_start_up_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # what `import nudenet` sees when it is not installed
    with pytest.raises(RuntimeError, match=r"needs the optional `safety` extra.*AGPL-3\.0"):
        build_safety(Settings(screeners="nudenet"))


# -- NudeNet, the real detector from the installed wheel


@pytest.fixture(scope="module")
def face_screener() -> NudeNetScreener:
    return NudeNetScreener({"FACE_FEMALE"}, 0.5)


def test_nudenet_loads_offline_from_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import nudenet

    assert (Path(nudenet.__file__).parent / "320n.onnx").is_file()  # the model ships in the wheel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("NudeNet tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    screener = NudeNetScreener({"FACE_FEMALE"}, 0.5)
    detections = screener.detect(drawn_face())
    assert [d["class"] for d in detections] == ["FACE_FEMALE"]
    assert 0.5 <= detections[0]["score"] <= 1


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_nudenet_blocks_a_configured_class_at_or_above_the_threshold(face_screener: NudeNetScreener,
                                                                     fmt: str) -> None:
    reason = face_screener.screen([drawn_face(fmt)])
    assert reason is not None and reason.startswith("nudenet: FACE_FEMALE 0.")
    assert reason.endswith(" >= 0.5")
    assert float(reason.split()[2]) >= 0.5


def test_nudenet_names_the_image_that_was_blocked_in_a_batch(face_screener: NudeNetScreener) -> None:
    reason = face_screener.screen([plain_wall(), drawn_face("webp")])
    assert reason is not None and reason.startswith("nudenet: image 1: FACE_FEMALE ")


def test_nudenet_passes_what_it_is_not_told_to_block() -> None:
    face = drawn_face()
    assert NudeNetScreener({"FACE_FEMALE"}, 0.95).screen([face]) is None  # below the threshold
    default_classes = build_safety(Settings(screeners="nudenet")).screeners[0]
    assert default_classes.screen([face, plain_wall("webp")]) is None  # a face is no exposed class
    assert NudeNetScreener({"FACE_FEMALE"}, 0.5).screen([plain_wall()]) is None


# -- end to end through a live server: a blocked prompt fails, is refunded and leaves no image


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live server on the torch-free engine (flat colours; the prompt's screening is the point) with
    a blocked-terms file and NudeNet on."""
    data_dir = tmp_path_factory.mktemp("guarded")
    terms = data_dir / "blocked.txt"
    terms.write_text("# test list\nforbidden fruit\n", encoding="utf-8")
    srv = start_server("tiny", data_dir, **serving("pixels", env={"KOLORS_API_BLOCKED_TERMS_FILE": str(terms),
                                                                 "KOLORS_API_SCREENERS": "nudenet"}))
    yield srv
    srv.stop()


def user_key(http: httpx.Client, credits: float = 5) -> str:
    r = http.post("/v1/admin/keys", json={"name": "user", "credits": credits}, headers={"x-api-key": ADMIN_KEY})
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def wait_done(http: httpx.Client, request_id: str, key: str) -> httpx.Response:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = http.get(f"/v2/requests/{request_id}/status", headers={"x-api-key": key})
        if r.json().get("status") in ("COMPLETED", "FAILED"):
            return r
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} not done in time")


SMALL = {"steps": 2, "width": 512, "height": 512, "output_format": "webp"}


def test_blocked_prompt_fails_refunds_and_stores_no_image(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        key = user_key(http)
        r = http.post("/v2/kolors", json={"prompt": "Still life with a ＦＯＲＢＩＤＤＥＮ fruit", **SMALL},
                      headers={"x-api-key": key})
        assert r.status_code == 200, r.text
        request_id = r.json()["request_id"]
        status = wait_done(http, request_id, key)
        assert status.status_code == 422
        assert status.json() == {"request_id": request_id, "status": "FAILED",
                                 "error": 'content blocked: prompt contains a blocked term: "forbidden fruit"'}
        assert http.get(f"/v2/requests/{request_id}", headers={"x-api-key": key}).status_code == 422
        assert http.get("/v1/account", headers={"x-api-key": key}).json()["credits"] == 5
        assert http.get(f"/v2/requests/{request_id}/outputs/0.webp", headers={"x-api-key": key}).status_code == 404
        assert not (guarded.data_dir / "outputs" / request_id).exists()
        # Sync answers the same block as 422.
        r = http.post("/v1/kolors", json={"prompt": "forbidden-fruit", **SMALL}, headers={"x-api-key": key})
        assert r.status_code == 422 and r.json()["error"].startswith("content blocked: ")
        assert r.headers["X-Request-Id"] == r.json()["request_id"]
        assert http.get("/v1/account", headers={"x-api-key": key}).json()["credits"] == 5


def test_clean_prompt_completes_and_is_charged_with_nudenet_on(guarded: LiveServer) -> None:
    """The control for the test above: same server, same key setup, a prompt it lets through."""
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        key = user_key(http)
        r = http.post("/v2/kolors", json={"prompt": "a forbidden city at dusk", **SMALL}, headers={"x-api-key": key})
        request_id = r.json()["request_id"]
        assert wait_done(http, request_id, key).json()["status"] == "COMPLETED"
        assert http.get("/v1/account", headers={"x-api-key": key}).json()["credits"] == pytest.approx(5 - 0.02)
        assert http.get(f"/v2/requests/{request_id}/outputs/0.webp", headers={"x-api-key": key}).status_code == 200
        assert (guarded.data_dir / "outputs" / request_id / "0.webp").is_file()
        noise = http.get(f"/v2/requests/{request_id}/outputs/0.webp", headers={"x-api-key": key}).content
    assert "screeners: nudenet" in guarded.log()
    # A flat colour (as the tiny model's noise): NudeNet reports nothing on it at all (nothing reaches
    # NudeNet's own 0.2 floor), whatever the classes and threshold. Hence the drawing engine below.
    assert NudeNetScreener(set(NUDENET_CLASSES), 0.0).detect(noise) == []


def test_serve_without_the_safety_extra_refuses_to_start(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "nudenet.py").write_text("raise ModuleNotFoundError(\"No module named 'nudenet'\")\n")
    proc, log = start_process(["serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                               "--model", "tiny"], tmp_path / "data",  # refused before any model loads
                              env={"KOLORS_API_SCREENERS": "nudenet", "PYTHONPATH": str(shim)})
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "needs the optional `safety` extra" in log.read_text()


def test_worker_with_a_missing_terms_file_refuses_to_start(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kolors_api.cli", "worker", "--data-dir", str(tmp_path),
                        "--store", redis_db_url(15)],
                       env={**os.environ, "KOLORS_API_BLOCKED_TERMS_FILE": str(tmp_path / "nope.txt")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "blocked_terms_file: cannot read" in r.stderr


# -- end to end through the API with an output block: the real app, worker, store and NudeNet;
#    only the engine is a stand-in, because the tiny model's noise is nothing NudeNet ever flags


@dataclass
class Picture:
    images: list[bytes]
    seeds: list[int]
    inference_time: float = 0.01


class DrawingEngine:
    """Draws a face when the prompt asks for a portrait, a plain wall otherwise."""

    def generate(self, p: GenerateParams, on_step: Callable[[int, int], None] | None = None) -> Picture:
        for step in range(1, p.steps + 1):
            if on_step is not None:
                on_step(step, p.steps)
        draw = drawn_face if "portrait" in p.prompt else plain_wall
        return Picture([draw(p.output_format) for _ in range(p.number_of_images)], p.seeds)


def drawing_engine(settings: Settings) -> DrawingEngine:
    """An engine factory (`Settings.engine = "tests.test_safety:drawing_engine"`)."""
    return DrawingEngine()


async def test_output_block_through_the_api_fails_refunds_and_stores_no_image(tmp_path: Path) -> None:
    from kolors_api.api.app import create_app

    settings = Settings(data_dir=tmp_path, bootstrap_key=ADMIN_KEY, engine=f"{__name__}:drawing_engine",
                        screeners="nudenet",
                        nudenet_classes="FACE_FEMALE,FACE_MALE", nudenet_threshold=0.5,
                        allowed_hosts="kolors.test")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://kolors.test", timeout=60) as http:
        for _ in range(200):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        r = await http.post("/v1/admin/keys", json={"name": "user", "credits": 5}, headers={"x-api-key": ADMIN_KEY})
        key = {"x-api-key": r.json()["key"]}

        async def run(prompt: str) -> tuple[str, httpx.Response]:
            submitted = await http.post("/v2/kolors", json={"prompt": prompt, "number_of_images": 2, **SMALL},
                                        headers=key)
            request_id = submitted.json()["request_id"]
            for _ in range(600):
                status = await http.get(f"/v2/requests/{request_id}/status", headers=key)
                if status.json()["status"] in ("COMPLETED", "FAILED"):
                    return request_id, status
                await asyncio.sleep(0.05)
            raise AssertionError(f"{prompt}: not done in time")

        blocked, status = await run("a portrait of a woman")
        assert status.status_code == 422
        error = status.json()["error"]
        assert error.startswith("content blocked: nudenet: image 0: FACE_FEMALE 0.") and error.endswith(" >= 0.5")
        assert (await http.get("/v1/account", headers=key)).json()["credits"] == 5
        assert (await http.get(f"/v2/requests/{blocked}/outputs/0.webp", headers=key)).status_code == 404
        assert not (tmp_path / "outputs" / blocked).exists()

        passed, status = await run("a plain wall")  # the control: same worker, same screener
        assert status.json()["status"] == "COMPLETED"
        assert (await http.get("/v1/account", headers=key)).json()["credits"] == pytest.approx(5 - 0.04)
        assert (await http.get(f"/v2/requests/{passed}/outputs/1.webp", headers=key)).status_code == 200
        assert (tmp_path / "outputs" / passed / "1.webp").is_file()
