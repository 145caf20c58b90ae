"""Drawing helpers for the visual task variants.

Every image is a white RGB square split into a fixed GRID x GRID layout of cells (16-pixel cells
at 64x64); all coordinates are fractions of a cell or block, so a larger image is the same
picture scaled up.
"""
from __future__ import annotations

from math import cos, pi, sin

from PIL import Image, ImageDraw, ImageFont

GRID = 4
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
SKIN = (240, 195, 160)
RGB = {
    "red": (220, 40, 40), "blue": (40, 90, 230), "green": (40, 170, 60),
    "yellow": (245, 210, 20), "purple": (150, 60, 190), "orange": (255, 140, 0),
    "brown": (140, 85, 40), "gray": (140, 140, 140), "black": (20, 20, 20), "pink": (250, 130, 190),
}
OBJECTS = ("ball", "box", "car", "cat", "fish", "house", "star", "tree")
OBJECT_COLOURS = {"ball": "red", "box": "brown", "car": "blue", "cat": "gray",
                  "fish": "orange", "house": "purple", "star": "yellow", "tree": "green"}
SHAPES = OBJECTS + ("cross", "diamond", "ring", "triangle")
PERSONS = ("girl", "boy", "man", "woman")
OPERATOR_STROKES = {  # line segments in cell fractions
    "+": (((.25, .5), (.75, .5)), ((.5, .25), (.5, .75))),
    "-": (((.25, .5), (.75, .5)),),
    "*": (((.3, .3), (.7, .7)), ((.3, .7), (.7, .3))),
    "/": (((.3, .85), (.7, .15)),),
}

Box = tuple[float, float, float, float]


def new_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), BACKGROUND)


def cell_box(cell: int, size: int) -> Box:
    """Pixel box of grid cell `cell` (row-major)."""
    if not 0 <= cell < GRID * GRID:
        raise ValueError(f"cell {cell} outside the {GRID}x{GRID} grid")
    row, col = divmod(cell, GRID)
    s = size / GRID
    return (col * s, row * s, (col + 1) * s, (row + 1) * s)


def _pts(box: Box, *uv: tuple[float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0 + (x1 - x0) * u, y0 + (y1 - y0) * v) for u, v in uv]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: str) -> None:
    """Draw `shape` filled with colour name `colour` inside `box`."""
    P = lambda *uv: _pts(box, *uv)  # noqa: E731
    w = max(1, round((box[2] - box[0]) / 16))
    kw = dict(fill=RGB[colour], outline=INK, width=w)
    if shape == "ball":
        draw.ellipse(P((.15, .15), (.85, .85)), **kw)
    elif shape == "box":
        draw.rectangle(P((.18, .18), (.82, .82)), **kw)
    elif shape == "car":
        draw.rectangle(P((.3, .2), (.7, .45)), **kw)
        draw.rectangle(P((.06, .42), (.94, .72)), **kw)
        for u in (.27, .73):
            draw.ellipse(P((u - .13, .6), (u + .13, .86)), fill=INK)
    elif shape == "cat":
        draw.polygon(P((.18, .5), (.22, .06), (.48, .34)), **kw)
        draw.polygon(P((.82, .5), (.78, .06), (.52, .34)), **kw)
        draw.ellipse(P((.15, .26), (.85, .92)), **kw)
    elif shape == "fish":
        draw.polygon(P((.6, .5), (.95, .22), (.95, .78)), **kw)
        draw.ellipse(P((.05, .26), (.72, .74)), **kw)
        draw.ellipse(P((.18, .4), (.28, .5)), fill=INK)
    elif shape == "house":
        draw.rectangle(P((.2, .45), (.8, .9)), **kw)
        draw.polygon(P((.08, .48), (.5, .08), (.92, .48)), **kw)
    elif shape == "star":
        draw.polygon(P(*[(.5 + r * sin(i * pi / 5), .55 - r * cos(i * pi / 5))
                         for i, r in zip(range(10), (.47, .2) * 5)]), **kw)
    elif shape == "tree":
        draw.rectangle(P((.4, .66), (.6, .94)), fill=RGB["brown"], outline=INK, width=w)
        draw.polygon(P((.5, .05), (.1, .72), (.9, .72)), **kw)
    elif shape == "cross":
        draw.polygon(P((.38, .1), (.62, .1), (.62, .38), (.9, .38), (.9, .62), (.62, .62),
                       (.62, .9), (.38, .9), (.38, .62), (.1, .62), (.1, .38), (.38, .38)), **kw)
    elif shape == "diamond":
        draw.polygon(P((.5, .06), (.92, .5), (.5, .94), (.08, .5)), **kw)
    elif shape == "ring":
        draw.ellipse(P((.1, .1), (.9, .9)), fill=RGB[colour], outline=INK, width=w)
        draw.ellipse(P((.32, .32), (.68, .68)), fill=BACKGROUND, outline=INK, width=w)
    elif shape == "triangle":
        draw.polygon(P((.5, .08), (.08, .9), (.92, .9)), **kw)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_person(draw: ImageDraw.ImageDraw, person: str, box: Box) -> None:
    """Stick figure: children are shorter; girl/woman wear a dress, boy/man a shirt."""
    if person not in PERSONS:
        raise ValueError(f"unknown person {person!r}; known: {PERSONS}")
    top = .3 if person in ("girl", "boy") else .04
    P = lambda *uv: _pts(box, *[(u, top + v * (1 - top)) for u, v in uv])  # noqa: E731
    w = max(1, round((box[2] - box[0]) / 16))
    for u in (.4, .6):  # legs
        draw.line(P((u, .7), (u, .98)), fill=INK, width=2 * w)
    if person in ("girl", "woman"):
        colour = "pink" if person == "girl" else "red"
        draw.polygon(P((.5, .3), (.2, .75), (.8, .75)), fill=RGB[colour], outline=INK, width=w)
    else:
        colour = "green" if person == "boy" else "blue"
        draw.rectangle(P((.3, .3), (.7, .72)), fill=RGB[colour], outline=INK, width=w)
    draw.ellipse(P((.36, .04), (.64, .3)), fill=SKIN, outline=INK, width=w)


def object_grid(objects: list[str], size: int, colours: list[str] | None = None,
                start: int = 0) -> Image.Image:
    """Objects one per cell from cell `start` on (row-major); canonical colours unless given."""
    img = new_image(size)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(objects):
        colour = colours[i] if colours else OBJECT_COLOURS[obj]
        draw_shape(draw, obj, cell_box(start + i, size), colour)
    return img


def char_grid(text: str, size: int) -> Image.Image:
    """One character per cell, rows wrapping; digits from the default font, operators drawn
    as strokes (bigger than the font's, and `*` as a multiplication cross)."""
    if len(text) > GRID * GRID:
        raise ValueError(f"{text!r} has more than {GRID * GRID} characters")
    img = new_image(size)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    font = ImageFont.load_default(size=round(cell * 1.1))
    for i, ch in enumerate(text):
        box = cell_box(i, size)
        if ch in OPERATOR_STROKES:
            for a, b in OPERATOR_STROKES[ch]:
                draw.line(_pts(box, a, b), fill=(0, 0, 0), width=max(1, round(cell / 9)))
        else:
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), ch, fill=(0, 0, 0),
                      font=font, anchor="mm", stroke_width=round(cell / 40), stroke_fill=(0, 0, 0))
    return img


def icon(parts: list[tuple[int, str, str]], size: int) -> Image.Image:
    """Synthetic entity icon: (cell, shape, colour) parts."""
    img = new_image(size)
    draw = ImageDraw.Draw(img)
    for cell, shape, colour in parts:
        draw_shape(draw, shape, cell_box(cell, size), colour)
    return img


def scene(person: str, shape: str, colour: str, size: int) -> Image.Image:
    """Synthetic scene: the person in the left 2x2-cell block, the event icon in the right one."""
    img = new_image(size)
    draw = ImageDraw.Draw(img)
    h = size / 2
    draw_person(draw, person, (0, h / 2, h, 3 * h / 2))
    draw_shape(draw, shape, (h, h / 2, size, 3 * h / 2), colour)
    return img
