"""Stage ``demo_data``: a deterministic synthetic stand-in for seized-phone images, four classes.

0 irrelevant: documents, landscapes, everyday objects. 1 chat: messenger screenshots with Korean
text in bubbles. 2 transaction place: street corners, lockers, benches, by day and night.
3 drug: pills, powder and crystals on table surfaces, some in zip bags. Sizes vary and include
phone portrait ratios; a few files are saved as HEIC or carry an EXIF rotation, as phones do. With
``bad_examples`` a handful of unusable files show what the manifest rejects and flags.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from forensic_vlm.config import ClassSpec, DemoConfig
from forensic_vlm.errors import OutputExistsError
from forensic_vlm.fonts import korean_font_path
from forensic_vlm.images import pillow_heif  # noqa: F401  (HEIC encoder registered)
from forensic_vlm.tables import sha256_file, write_tsv

log = logging.getLogger(__name__)

Rng = np.random.Generator
#: (width, height) in pixels: phone portrait (9:19.5, 9:16, 3:4), landscape and square.
SIZES = ((360, 780), (288, 512), (300, 400), (512, 288), (400, 300), (360, 360), (480, 360))
CHAT_LINES = (
    "얼음 있어요?",
    "내일 거기서 봐요",
    "입금 확인했어요",
    "물건 몇 개 필요해요?",
    "지난번 그 장소",
    "좌표 보내줄게요",
    "사진 지우세요",
    "텔레 아이디 알려줘",
    "허브 0.5 가능?",
    "던지기로 할게요",
    "ㅇㅋ 30분 후",
    "현금만 받아요",
    "Ok send the pin",
    "아이스 1g 얼마?",
)
DOC_LINES = ("회의록 2025-03-14", "견적서 / Invoice", "주간 업무 보고", "Meeting notes", "영수증", "공지사항")


def korean_font(size: int) -> ImageFont.FreeTypeFont:
    """NanumGothic, shipped inside the koreanize-matplotlib wheel (no system font needed)."""
    return ImageFont.truetype(str(korean_font_path()), size)


def _color(rng: Rng, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _noise(image: Image.Image, rng: Rng, amount: float) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, amount, (image.height, image.width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_irrelevant(rng: Rng, size: tuple[int, int]) -> Image.Image:
    width, height = size
    kind = rng.integers(3)
    if kind == 0:  # a document page
        image = Image.new("RGB", size, (250, 250, 246))
        draw = ImageDraw.Draw(image)
        draw.text((20, 18), str(rng.choice(DOC_LINES)), fill=(20, 20, 20), font=korean_font(max(14, width // 18)))
        for y in range(60, height - 20, 16):
            draw.rectangle((20, y, 20 + rng.integers(width // 3, width - 40), y + 6), fill=(120, 120, 125))
        return image
    if kind == 1:  # a landscape: sky, mountains, sun
        image = Image.new("RGB", size, _color(rng, 120, 220))
        draw = ImageDraw.Draw(image)
        for band in range(3):
            base = int(height * (0.45 + 0.15 * band))
            points = [(0, height)] + [(x, base - int(rng.integers(0, height // 4))) for x in range(0, width + 60, 60)]
            draw.polygon([*points, (width, height)], fill=(40 + 30 * band, 110 + 30 * band, 50))
        draw.ellipse((width - 90, 20, width - 40, 70), fill=(255, 230, 120))
        return image
    image = Image.new("RGB", size, _color(rng, 160, 240))  # everyday objects on a plain background
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 5)):
        x, y = rng.integers(0, width - 80), rng.integers(0, height - 80)
        w, h = rng.integers(40, 120, 2)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w, y + h), fill=_color(rng, 0, 200), outline=(0, 0, 0), width=2)
    return image


def draw_chat(rng: Rng, size: tuple[int, int]) -> Image.Image:
    width, height = size
    background = (178, 199, 217) if rng.random() < 0.6 else (236, 236, 240)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = korean_font(max(12, width // 24))
    draw.rectangle((0, 0, width, 44), fill=(60, 64, 72))
    draw.text((14, 12), f"익명 {rng.integers(100, 999)}", fill=(255, 255, 255), font=font)
    y = 56
    while y < height - 50:
        text = str(rng.choice(CHAT_LINES))
        box = draw.textbbox((0, 0), text, font=font)
        w, h = box[2] - box[0] + 20, box[3] - box[1] + 16
        mine = rng.random() < 0.5
        x = width - w - 12 if mine else 48
        if not mine:
            draw.ellipse((8, y, 40, y + 32), fill=_color(rng, 90, 200))
        draw.rounded_rectangle((x, y, x + w, y + h), radius=10, fill=(254, 229, 0) if mine else (255, 255, 255))
        draw.text((x + 10, y + 6), text, fill=(25, 25, 25), font=font)
        y += h + int(rng.integers(10, 24))
    draw.rectangle((0, height - 42, width, height), fill=(250, 250, 250))
    return image


def draw_place(rng: Rng, size: tuple[int, int]) -> Image.Image:
    width, height = size
    night = rng.random() < 0.35
    sky = (25, 30, 55) if night else _color(rng, 150, 215)
    image = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.45, 0.65))
    x = 0
    while x < width:  # buildings with lit or dark windows
        w, top = int(rng.integers(50, 120)), int(rng.integers(height // 8, horizon - 20))
        draw.rectangle((x, top, x + w, horizon), fill=_color(rng, 60, 140))
        for wy in range(top + 8, horizon - 12, 18):
            for wx in range(x + 6, x + w - 10, 16):
                lit = (250, 220, 120) if night and rng.random() < 0.5 else (40, 50, 70)
                draw.rectangle((wx, wy, wx + 8, wy + 10), fill=lit)
        x += w + int(rng.integers(0, 20))
    draw.rectangle((0, horizon, width, height), fill=(70, 70, 75) if not night else (35, 35, 40))
    for stripe in range(0, width, 60):  # road markings
        draw.rectangle(
            (stripe, horizon + (height - horizon) // 2, stripe + 30, horizon + (height - horizon) // 2 + 5),
            fill=(230, 230, 200),
        )
    prop = rng.integers(3)
    px = int(rng.integers(10, max(11, width - 110)))
    if prop == 0:  # a bench
        draw.rectangle((px, horizon + 20, px + 90, horizon + 32), fill=(120, 80, 40))
    elif prop == 1:  # a row of lockers
        for i in range(3):
            draw.rectangle(
                (px + 30 * i, horizon - 70, px + 30 * i + 28, horizon), fill=(150, 155, 160), outline=(50, 50, 50)
            )
    else:  # a street lamp
        draw.rectangle((px, horizon - 120, px + 5, horizon), fill=(30, 30, 30))
        draw.ellipse(
            (px - 10, horizon - 130, px + 15, horizon - 110), fill=(255, 240, 180) if night else (200, 200, 190)
        )
    return _noise(image, rng, 6)


def draw_drug(rng: Rng, size: tuple[int, int]) -> Image.Image:
    width, height = size
    surface = _color(rng, 20, 90) if rng.random() < 0.6 else (140, 100, 60)
    image = _noise(Image.new("RGB", size, surface), rng, 10)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.4:  # a zip bag
        bx, by = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
        draw.rectangle((bx, by, bx + width // 2, by + height // 2), outline=(230, 230, 235), width=3)
        draw.rectangle((bx, by, bx + width // 2, by + 8), fill=(200, 60, 60))
    kind = rng.integers(3)
    for _ in range(int(rng.integers(15, 40))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:  # pills
            r = int(rng.integers(6, 14))
            draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=_color(rng, 200, 256), outline=(160, 160, 160))
        elif kind == 1:  # crystals
            pts = [(x + int(dx), y + int(dy)) for dx, dy in rng.integers(-12, 12, (5, 2))]
            draw.polygon(pts, fill=(225, 235, 245), outline=(255, 255, 255))
        else:  # powder grains
            r = int(rng.integers(2, 5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(245, 245, 245))
    if kind == 2:  # a powder heap
        cx, cy = width // 2, height // 2
        draw.ellipse((cx - width // 4, cy - height // 8, cx + width // 4, cy + height // 8), fill=(240, 240, 238))
        image = image.filter(ImageFilter.GaussianBlur(1))
    return image


DRAWERS: dict[int, Callable[[Rng, tuple[int, int]], Image.Image]] = {
    0: draw_irrelevant,
    1: draw_chat,
    2: draw_place,
    3: draw_drug,
}


def _encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "heic":
        image.save(buffer, format="HEIF", quality=80)
    elif kind == "rotated":  # stored sideways with EXIF orientation 6, as phone cameras do
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=88, exif=exif)
    elif kind == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def _empty_folder(out_dir: Path, replace: bool) -> None:
    """An existing non-empty folder is deleted only with ``replace`` (the workflow's own folder
    under results/demo); otherwise it is an error, so no other folder is ever touched."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not replace:
            raise OutputExistsError(f"{out_dir} exists and is not empty; demo data goes into a new folder")
        shutil.rmtree(out_dir)


def generate_demo_data(
    out_dir: Path, listing: Path, classes: list[ClassSpec], config: DemoConfig, *, replace: bool = False
) -> int:
    """Write the synthetic evidence folder and a listing (path, size, sha256) of it.

    An existing non-empty ``out_dir`` is deleted only with ``replace=True`` (the workflow's own
    ``results/demo/raw_data``); otherwise it is an error, so no other folder is ever touched.
    Returns the number of files written.
    """
    out_dir, listing = Path(out_dir), Path(listing)
    _empty_folder(out_dir, replace)
    written = 0
    for spec in classes:
        folder = out_dir / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        drawer = DRAWERS[spec.id % len(DRAWERS)]
        for index in range(config.images_per_class):
            rng = np.random.default_rng([config.seed, spec.id, index])
            size = SIZES[int(rng.integers(len(SIZES)))]
            kind = "heic" if index % 29 == 7 else "rotated" if index % 23 == 5 else "png" if index % 5 == 0 else "jpeg"
            suffix = {"heic": ".heic", "png": ".png"}.get(kind, ".jpg")
            (folder / f"{spec.folder}_{index:04d}{suffix}").write_bytes(_encode(drawer(rng, size), kind))
            written += 1
    if config.bad_examples:
        written += write_bad_examples(out_dir, classes)
    rows = [
        {"path": str(p.relative_to(out_dir)), "size_bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    ]
    write_tsv(listing, ("path", "size_bytes", "sha256"), rows)
    log.info("demo data: %d files under %s", written, out_dir)
    return written


#: Where a phone keeps each class's pictures, roughly: (folder, file name pattern).
EXTRACTION_PLACES = {
    0: (("DCIM/Camera", "IMG_2026{:04d}.jpg"), ("Pictures/Screenshots", "Screenshot_2026{:04d}.png")),
    1: (("Pictures/Screenshots", "Screenshot_2026{:04d}.png"), ("Telegram/Telegram Images", "{:04d}_telegram.jpg")),
    2: (("DCIM/Camera", "IMG_2026{:04d}.jpg"), ("Download", "map_{:04d}.png")),
    3: (("DCIM/Camera", "IMG_2026{:04d}.jpg"), ("Telegram/Telegram Images", "{:04d}_telegram.jpg")),
}


def generate_demo_extraction(
    out_dir: Path, listing: Path, classes: list[ClassSpec], config: DemoConfig, *, replace: bool = False
) -> int:
    """An unlabeled folder laid out like a phone extraction, for classify; returns files written.

    The true class of each image is written only to ``listing`` (path, size, sha256, true_class),
    outside the folder, so the demo can say how the triage did. With ``bad_examples``, the folder
    also holds files that cannot be scored (empty, truncated, not an image) and an exact duplicate.
    """
    out_dir, listing = Path(out_dir), Path(listing)
    _empty_folder(out_dir, replace)
    truth: dict[str, int] = {}
    for index in range(config.extraction_images):
        rng = np.random.default_rng([config.seed, 7, index])
        spec = classes[int(rng.integers(len(classes)))]
        folder, pattern = EXTRACTION_PLACES[spec.id % len(EXTRACTION_PLACES)][int(rng.integers(2))]
        path = out_dir / folder / pattern.format(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = SIZES[int(rng.integers(len(SIZES)))]
        path.write_bytes(
            _encode(DRAWERS[spec.id % len(DRAWERS)](rng, size), "png" if path.suffix == ".png" else "jpeg")
        )
        truth[str(path.relative_to(out_dir))] = spec.id
    if config.bad_examples:
        first = out_dir / next(iter(truth))
        bad = {
            "Download/empty.jpg": b"",
            "Download/chat_export.txt": b"not an image: exported chat log\n",
            "Telegram/Telegram Images/partial_download.jpg": first.read_bytes()[: first.stat().st_size // 2],
            "DCIM/Camera/copy_of_" + first.name: first.read_bytes(),  # an exact duplicate, scored once
        }
        for relative, data in bad.items():
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / relative).write_bytes(data)
        truth["DCIM/Camera/copy_of_" + first.name] = truth[str(first.relative_to(out_dir))]
    rows = _write_truth_listing(out_dir, listing, truth)
    log.info("demo extraction: %d files under %s", len(rows), out_dir)
    return len(rows)


def _write_truth_listing(out_dir: Path, listing: Path, truth: dict[str, int]) -> list[dict]:
    """Every file under ``out_dir`` (path, size_bytes, sha256, true_class: empty for a file with
    no class), written to ``listing`` outside the folder; returns the rows."""
    rows = [
        {
            "path": str(p.relative_to(out_dir)),
            "size_bytes": p.stat().st_size,
            "sha256": sha256_file(p),
            "true_class": truth.get(str(p.relative_to(out_dir)), ""),
        }
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    ]
    write_tsv(listing, ("path", "size_bytes", "sha256", "true_class"), rows)
    return rows


def new_phone_look(image: Image.Image) -> Image.Image:
    """The demo's new phone: a camera and a theme whose colours are unlike raw_data's, drawn as
    the colour channels rotated (R, G, B -> B, R, G). The scenes are raw_data's; only the colours
    are new, so a model trained on raw_data alone gets about a third of them wrong
    (docs/review.md)."""
    red, green, blue = image.convert("RGB").split()
    return Image.merge("RGB", (blue, red, green))


def generate_demo_review_case(
    out_dir: Path,
    listing: Path,
    classes: list[ClassSpec],
    config: DemoConfig,
    *,
    case: str,
    export: Path,
    replace: bool = False,
) -> int:
    """A new phone's extraction (``demo.review_case_images`` images, every class in turn, in the
    :func:`new_phone_look`), for the review loop; returns files written.

    As in :func:`generate_demo_extraction`, the true classes are only in ``listing`` (path,
    size_bytes, sha256, true_class), outside the folder, and in ``export``: the examiner's decisions
    as a forensic suite exports them (a CSV of SHA-256 and Category, the class's English name), for
    ``forensic-vlm review import``. Each case's images come from a seed of its own (``case``), so two cases never share an image.
    """
    out_dir, listing = Path(out_dir), Path(listing)
    _empty_folder(out_dir, replace)
    truth: dict[str, int] = {}
    for index in range(config.review_case_images):
        rng = np.random.default_rng([config.seed, 11, zlib.crc32(case.encode()), index])
        spec = classes[index % len(classes)]
        folder, pattern = EXTRACTION_PLACES[spec.id % len(EXTRACTION_PLACES)][int(rng.integers(2))]
        path = out_dir / folder / pattern.format(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = new_phone_look(DRAWERS[spec.id % len(DRAWERS)](rng, SIZES[int(rng.integers(len(SIZES)))]))
        path.write_bytes(_encode(image, "png" if path.suffix == ".png" else "jpeg"))
        truth[str(path.relative_to(out_dir))] = spec.id
    rows = _write_truth_listing(out_dir, listing, truth)
    by_id = {spec.id: spec for spec in classes}
    with open(export, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SHA-256", "Category"])
        writer.writerows([row["sha256"], by_id[row["true_class"]].en] for row in rows)
    log.info("demo review case %s: %d files under %s", case, len(rows), out_dir)
    return len(rows)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def write_bad_examples(out_dir: Path, classes: list[ClassSpec]) -> int:
    """Files the manifest must reject or flag; one of each kind that a demo can safely hold."""
    folders = [out_dir / c.folder for c in classes]
    original = sorted(folders[0].iterdir())[1]
    jpeg = next(p for p in sorted(folders[-1].iterdir()) if p.suffix == ".jpg").read_bytes()
    carved = _encode(draw_place(np.random.default_rng(998), (320, 640)), "png")
    conflict = _encode(draw_drug(np.random.default_rng(999), (200, 200)), "jpeg")
    files = {
        folders[0] / "empty.jpg": b"",
        folders[-1] / "truncated_download.jpg": jpeg[: len(jpeg) // 2],
        folders[1 % len(folders)] / "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x13" * 200,
        folders[1 % len(folders)] / "chat_export.txt": b"not an image: exported chat log\n",
        folders[0] / "huge_canvas.png": bomb_png(20_000, 20_000),
        folders[2 % len(folders)] / "carved_0001.jpg": carved,  # PNG content behind a .jpg name
        folders[0] / f"copy_of_{original.name}": original.read_bytes(),  # exact duplicate within one class
        folders[1 % len(folders)] / "shared_photo.jpg": conflict,  # same bytes under two classes
        folders[-1] / "shared_photo.jpg": conflict,
        out_dir / "stray_file.jpg": jpeg,  # outside every class folder
    }
    for path, data in files.items():
        path.write_bytes(data)
    return len(files)
