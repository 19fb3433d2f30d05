"""Image intake (API side, no torch): every way a picture comes in, and every refusal, as a 400 naming the field.

URLs are fetched from a real picture server on loopback (allowed through KOLORS_API_FETCH_ALLOW_HOSTS'
policy); private addresses are refused by the SSRF guard before anything is dialled."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import pytest
from PIL import Image

from kolors_api.api.intake import Intake
from kolors_api.api.ssrf import Policy
from kolors_api.errors import BadRequest
from kolors_api.images import auto_size, fit, open_image
from kolors_api.schema import IMG2IMG, MODEL, NO_IP_ADAPTER, validate_request, with_inputs
from tests.pictures import PictureServer, Route, b64, bomb_png, picture, timed

PNG = picture(96, 80)
SHA = hashlib.sha256(PNG).hexdigest()


@pytest.fixture(scope="module")
def pictures() -> Iterator[PictureServer]:
    srv = PictureServer()
    srv.routes.update({
        "/ok.png": Route(200, PNG, {"content-type": "image/png"}),
        "/moved": Route(302, b"", {"location": "/ok.png"}),
        "/to-private": Route(302, b"", {"location": "http://10.0.0.5/x.png"}),
        "/r1": Route(302, b"", {"location": "/r2"}), "/r2": Route(302, b"", {"location": "/r3"}),
        "/r3": Route(302, b"", {"location": "/r4"}), "/r4": Route(302, b"", {"location": "/ok.png"}),
        "/big": Route(200, b"\0" * 5000, {"content-type": "image/png"}),
        "/big-chunked": Route(200, b"\0" * 5000, chunked=True),
        "/slow.png": Route(200, PNG, delay=30),
        "/text": Route(200, b"<html>hello</html>", {"content-type": "text/html"}),
    })
    yield srv
    srv.close()


@pytest.fixture
def intake() -> Intake:
    return Intake(Policy("127.0.0.1"), timeout=5.0)


async def refused(intake: Intake, value: str, field: str = "image") -> str:
    with pytest.raises(BadRequest) as exc:
        await intake.take(field, value)
    message = exc.value.message
    assert message.startswith(f"{field}: "), message
    return message


# -- the ways in
async def test_base64_data_uri_and_url_give_the_same_picture(intake: Intake, pictures: PictureServer) -> None:
    got = [await intake.take("image", value) for value in
           (b64(PNG), f"data:image/png;base64,{b64(PNG)}", f"{pictures.url}/ok.png", f"{pictures.url}/moved")]
    assert {p.sha256 for p in got} == {SHA}
    assert all(p.data == PNG and (p.width, p.height) == (96, 80) for p in got)


async def test_base64_with_line_breaks_and_url_safe_alphabet_is_taken(intake: Intake) -> None:
    text = b64(PNG)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert (await intake.take("image", wrapped)).sha256 == SHA
    urlsafe = text.replace("+", "-").replace("/", "_").rstrip("=")
    assert (await intake.take("image", urlsafe)).sha256 == SHA


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
async def test_jpeg_and_webp_are_taken(intake: Intake, fmt: str) -> None:
    got = await intake.take("ip_adapter_image", b64(picture(70, 90, fmt)))
    assert (got.width, got.height) == (70, 90)


# -- the refusals
async def test_not_an_image_is_refused(intake: Intake) -> None:
    assert await refused(intake, b64(b"hello, world, this is text" * 10)) == \
        "image: not a PNG, JPEG or WebP image"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
async def test_other_formats_are_refused(intake: Intake, fmt: str) -> None:
    assert "not a PNG, JPEG or WebP image" in await refused(intake, b64(picture(80, 80, fmt)))


async def test_a_decompression_bomb_is_refused_from_its_header_unread(intake: Intake) -> None:
    bomb = bomb_png(10000)
    assert len(bomb) < 100_000  # a few KB that claim 10^8 pixels
    seconds = timed(lambda: pytest.raises(BadRequest, intake.check, "image", bomb))
    assert seconds < 1.0  # refused from the header, in well under a second (the bound)
    assert await refused(intake, b64(bomb)) == "image: 10000x10000 is more than 4096x4096 pixels"


async def test_too_small_is_refused(intake: Intake) -> None:
    assert await refused(intake, b64(picture(32, 200))) == "image: 32x200 is less than 64 pixels on a side"


async def test_truncated_data_is_refused(intake: Intake) -> None:
    assert await refused(intake, b64(picture(300, 300)[:400])) == "image: the image data is truncated or corrupt"


async def test_bad_base64_is_refused(intake: Intake) -> None:
    assert "not an http(s) URL, a data URI or valid base64" in await refused(intake, "%%%not base64%%%")


async def test_empty_is_refused(intake: Intake) -> None:
    assert await refused(intake, "  ") == "image: must not be empty"


async def test_a_data_uri_must_be_base64(intake: Intake) -> None:
    assert "data URI must be base64" in await refused(intake, "data:image/png,rawbytes")


async def test_other_schemes_are_refused(intake: Intake) -> None:
    assert "must be an http or https URL" in await refused(intake, "ftp://example.com/a.png")
    assert "must be an http or https URL" in await refused(intake, "file:///etc/passwd")


async def test_larger_than_the_limit_is_refused() -> None:
    small = Intake(Policy("127.0.0.1"), max_bytes=2**20)
    assert await refused(small, b64(b"\0" * (2**20 + 10))) == "image: larger than 1 MB"


async def test_a_url_answering_404_is_refused(intake: Intake, pictures: PictureServer) -> None:
    assert await refused(intake, f"{pictures.url}/nothing.png") == "image: the URL answered 404"


async def test_a_url_that_is_no_image_is_refused(intake: Intake, pictures: PictureServer) -> None:
    assert await refused(intake, f"{pictures.url}/text") == "image: not a PNG, JPEG or WebP image"


async def test_loopback_is_refused_unless_allowed(pictures: PictureServer) -> None:
    guarded = Intake(Policy(""))
    message = await refused(guarded, f"{pictures.url}/ok.png")
    assert message.startswith("image: host 127.0.0.1 is not allowed (127.0.0.1 is a loopback address")
    assert "KOLORS_API_FETCH_ALLOW_HOSTS" in message


@pytest.mark.parametrize("url", ["http://10.0.0.5/a.png", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/a.png", "http://0x0a000005/a.png", "http://192.168.1.2/a.png"])
async def test_private_addresses_are_refused(intake: Intake, url: str) -> None:
    message = await refused(intake, url, "ip_adapter_image")
    assert "is not allowed" in message


async def test_every_redirect_is_checked_again(intake: Intake, pictures: PictureServer) -> None:
    message = await refused(intake, f"{pictures.url}/to-private")
    assert message.startswith("image: host 10.0.0.5 is not allowed (10.0.0.5 is a private address")


async def test_at_most_three_redirects(intake: Intake, pictures: PictureServer) -> None:
    assert await refused(intake, f"{pictures.url}/r1") == "image: the URL redirected more than 3 times"
    assert (await intake.take("image", f"{pictures.url}/r2")).sha256 == SHA  # three are fine


async def test_a_url_body_over_the_limit_is_refused(pictures: PictureServer) -> None:
    small = Intake(Policy("127.0.0.1"), max_bytes=4000)
    assert "larger than" in await refused(small, f"{pictures.url}/big")  # by its Content-Length
    assert "larger than" in await refused(small, f"{pictures.url}/big-chunked")  # while streaming


async def test_a_url_that_does_not_answer_in_time_is_refused(pictures: PictureServer) -> None:
    quick = Intake(Policy("127.0.0.1"), timeout=0.5)
    assert await refused(quick, f"{pictures.url}/slow.png") == "image: the URL did not answer within 0.5s"


async def test_a_host_that_does_not_resolve_is_refused(intake: Intake) -> None:
    assert await refused(intake, "http://no-such-host.invalid/a.png") == \
        "image: no-such-host.invalid does not resolve"


# -- what is decoded
def test_exif_orientation_is_applied() -> None:
    image = Image.open(io.BytesIO(picture(120, 80)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    assert open_image(buf.getvalue()).size == (80, 120)


def test_the_first_frame_of_an_animation_is_taken() -> None:
    frames = [Image.new("RGB", (80, 80), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert open_image(buf.getvalue()).getpixel((40, 40)) == (255, 0, 0)


def test_transparency_goes_on_white() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (80, 80), (0, 0, 0, 0)).save(buf, "PNG")
    image = open_image(buf.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_fit_covers_and_centre_crops() -> None:
    wide = Image.new("RGB", (200, 100))
    wide.paste((255, 0, 0), (0, 0, 50, 100))  # a red band on the left goes with the crop
    out = fit(wide, 100, 100)
    assert out.size == (100, 100) and out.getpixel((1, 50)) != (255, 0, 0)


def test_auto_size_keeps_the_aspect_ratio_within_range() -> None:
    assert auto_size(1024, 768) == (1024, 768)
    assert auto_size(96, 80) == (616, 512)  # scaled up to 512 on the short side
    assert auto_size(4000, 1000) == (2048, 512)
    assert auto_size(800, 600, given_width=1024) == (1024, 768)


# -- the body checks around the pictures
def test_strength_limits() -> None:
    body = {"prompt": "p", "image": "x"}
    for strength, says in ((0, "must be more than 0"), (-0.1, "between 0 and 1"), (1.5, "between 0 and 1"),
                           ("a", "must be a number")):
        with pytest.raises(BadRequest, match=f"^strength: .*{says}"):
            validate_request({**body, "strength": strength}, IMG2IMG)
    with pytest.raises(BadRequest, match=r"^strength: steps × strength must be at least 1"):
        validate_request({**body, "steps": 4, "strength": 0.2}, IMG2IMG)
    assert validate_request({**body, "steps": 4, "strength": 0.25}, IMG2IMG).params.steps_run == 1


def test_image_is_required_on_img2img_and_unknown_on_kolors() -> None:
    with pytest.raises(BadRequest, match="^image: is required"):
        validate_request({"prompt": "p"}, IMG2IMG)
    with pytest.raises(BadRequest, match="^image, strength: unknown fields"):
        validate_request({"prompt": "p", "image": "x", "strength": 0.5}, MODEL)
    with pytest.raises(BadRequest, match="^image: must be a string"):
        validate_request({"prompt": "p", "image": 5}, IMG2IMG)


def test_ip_adapter_image_without_an_ip_adapter_is_the_designed_400() -> None:
    with pytest.raises(BadRequest) as exc:
        validate_request({"prompt": "p", "ip_adapter_image": "x"}, MODEL, ip_adapter=False)
    assert exc.value.message == NO_IP_ADAPTER == \
        "ip_adapter_image: this server has no IP-Adapter (start it with --ip-adapter)"


def test_records_carry_the_sha256_and_the_size_follows_the_input() -> None:
    checked = validate_request({"prompt": "p", "image": "x", "seed": 1}, IMG2IMG)
    params = with_inputs(checked, {"image": (SHA, 1200, 900)})
    record = params.to_dict()
    assert record["image"] == SHA and record["strength"] == 0.75 and "inputs" not in record
    assert (params.width, params.height) == (1200, 896)
    plain = validate_request({"prompt": "p", "seed": 1}, MODEL).params.to_dict()
    assert "image" not in plain and "strength" not in plain and "ip_adapter_scale" not in plain
