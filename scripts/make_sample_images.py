"""Regenerate the sample images in input/ (drawn with Pillow, no downloads).

    python scripts/make_sample_images.py

- image_1.png: a photo-like outdoor scene (the tutorial's default input for "describe this image")
- image_2.png: a document page with headings, a paragraph and a table (for OCR)
- image_3.png: a 1288x728 web-page screenshot (for image-to-HTML; the size the benchmark uses)
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

OUT = Path(__file__).resolve().parent.parent / "input"
FONT_DIRS = ["/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts", "C:/Windows/Fonts"]


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for d in FONT_DIRS:
        p = Path(d) / name
        if p.exists():
            return ImageFont.truetype(str(p), size)
    return ImageFont.load_default(size=size)


def scene(w: int = 1024, h: int = 683) -> Image.Image:
    rng = random.Random(7)
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky gradient
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(90 + 120 * t), int(150 + 80 * t), int(230 - 20 * t)))
    d.ellipse([760, 70, 880, 190], fill=(255, 236, 160))  # sun
    for i, (base, col) in enumerate([(430, (70, 120, 80)), (480, (50, 100, 60)), (540, (40, 85, 45))]):
        pts = [(0, h)]
        for x in range(0, w + 16, 16):
            pts.append((x, base + 40 * math.sin(x / (150 + 40 * i) + i) + rng.randint(-4, 4)))
        pts.append((w, h))
        d.polygon(pts, fill=col)
    d.rectangle([0, 600, w, h], fill=(70, 110, 160))  # lake
    for _ in range(60):
        x, y = rng.randint(0, w), rng.randint(605, h)
        d.line([(x, y), (x + rng.randint(10, 40), y)], fill=(150, 190, 230))
    d.rectangle([205, 440, 225, 560], fill=(90, 60, 35))  # tree
    d.ellipse([150, 340, 280, 470], fill=(30, 110, 50))
    d.rectangle([560, 470, 700, 560], fill=(200, 80, 60))  # red house
    d.polygon([(545, 470), (630, 400), (715, 470)], fill=(120, 50, 40))
    d.rectangle([615, 510, 645, 560], fill=(80, 50, 30))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def document(w: int = 1000, h: int = 1300) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((80, 70), "Quarterly Report: Q3 2026", font=font(40, True), fill="black")
    d.text((80, 130), "Northwind Trading Company", font=font(24), fill=(80, 80, 80))
    body = (
        "Revenue grew 12% over the previous quarter, driven by strong demand for\n"
        "outdoor equipment. Operating costs stayed flat while shipping times fell\n"
        "from 5.2 to 3.8 days on average. The table below lists sales by region."
    )
    d.multiline_text((80, 200), body, font=font(22), fill="black", spacing=10)
    d.text((80, 330), "1. Sales by region", font=font(28, True), fill="black")
    rows = [("Region", "Units", "Revenue (EUR)", "Change"), ("North", "1,240", "186,000", "+8%"),
            ("South", "980", "147,500", "+15%"), ("East", "1,530", "229,400", "+11%"), ("West", "760", "114,200", "-3%")]
    x0, y0, cw, rh = 80, 390, [180, 160, 260, 160], 56
    for r, row in enumerate(rows):
        x = x0
        for c, cell in enumerate(row):
            d.rectangle([x, y0 + r * rh, x + cw[c], y0 + (r + 1) * rh], outline="black", width=2,
                        fill=(230, 230, 230) if r == 0 else "white")
            d.text((x + 14, y0 + r * rh + 14), cell, font=font(22, r == 0), fill="black")
            x += cw[c]
    d.text((80, 720), "2. Outlook", font=font(28, True), fill="black")
    d.multiline_text((80, 780), "We expect demand to soften in Q4. Priorities:\n"
                     "  - open the Lyon warehouse in November\n  - cut return processing time by 20%\n"
                     "  - launch the spring catalogue early", font=font(22), fill="black", spacing=10)
    d.text((80, 1220), "Page 1 of 3", font=font(18), fill=(120, 120, 120))
    return img


def webpage(w: int = 1288, h: int = 728) -> Image.Image:
    img = Image.new("RGB", (w, h), (245, 247, 250))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 72], fill=(28, 42, 74))
    d.text((40, 20), "Skyline Travel", font=font(28, True), fill="white")
    for i, item in enumerate(["Destinations", "Deals", "About", "Contact"]):
        d.text((640 + i * 160, 26), item, font=font(20), fill=(210, 220, 240))
    d.rectangle([0, 72, w, 380], fill=(64, 120, 200))
    d.text((80, 140), "Find your next adventure", font=font(48, True), fill="white")
    d.text((80, 215), "Flights, hotels and tours in 140 countries.", font=font(24), fill=(230, 238, 250))
    d.rounded_rectangle([80, 280, 330, 340], radius=10, fill=(255, 170, 40))
    d.text((118, 295), "Search trips", font=font(24, True), fill=(30, 30, 30))
    cards = [("Lisbon", "from 129 EUR", (240, 200, 120)), ("Kyoto", "from 689 EUR", (230, 150, 160)),
             ("Reykjavik", "from 249 EUR", (150, 190, 230))]
    for i, (city, price, col) in enumerate(cards):
        x = 80 + i * 390
        d.rounded_rectangle([x, 420, x + 350, 680], radius=14, fill="white", outline=(220, 225, 235), width=2)
        d.rounded_rectangle([x + 16, 436, x + 334, 580], radius=10, fill=col)
        d.text((x + 24, 596), city, font=font(26, True), fill=(30, 40, 60))
        d.text((x + 24, 634), price, font=font(20), fill=(90, 100, 120))
    return img


def main() -> None:
    OUT.mkdir(exist_ok=True)
    scene().save(OUT / "image_1.png", optimize=True)
    document().save(OUT / "image_2.png", optimize=True)
    webpage().save(OUT / "image_3.png", optimize=True)
    print(f"wrote {OUT}/image_1.png, image_2.png, image_3.png")


if __name__ == "__main__":
    main()
