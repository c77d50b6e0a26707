"""Regenerate examples/shapes: eight 64 px coloured shapes with captions (the example dataset).

Deterministic (no randomness), needs only Pillow: `python examples/make_shapes.py`.
"""

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}
ITEMS = [
    ("red", "circle"), ("blue", "circle"), ("green", "square"), ("yellow", "square"),
    ("red", "triangle"), ("blue", "triangle"), ("green", "circle"), ("yellow", "triangle"),
]  # fmt: skip


def main() -> None:
    out = Path(__file__).resolve().parent / "shapes"
    out.mkdir(exist_ok=True)
    for colour, shape in ITEMS:
        image = Image.new("RGB", (64, 64), (250, 248, 240))
        draw = ImageDraw.Draw(image)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((12, 12, 52, 52), fill=fill)
        elif shape == "square":
            draw.rectangle((14, 14, 50, 50), fill=fill)
        else:
            draw.polygon([(32, 10), (54, 52), (10, 52)], fill=fill)
        image.save(out / f"{colour}-{shape}.png", optimize=True)
        (out / f"{colour}-{shape}.txt").write_text(f"shapestyle, a {colour} {shape} on a cream background\n")


if __name__ == "__main__":
    main()
