"""The Pillow plot puts each value where its axes say, with a legend; the contact sheet keeps every image."""
from PIL import Image

from finetune.evaluation.plot import HEIGHT, SERIES, WIDTH, axes_for, nice_step, plot_metrics
from finetune.evaluation.sheets import HEADER, LABEL_WIDTH, contact_sheet

ROWS = [  # five series kept well apart so no marker covers another
    {"checkpoint": "base", "step": 0, "dino": 0.40, "clip_i": 0.70, "clip_t": 0.30, "class_dino": 0.20,
     "class_dino_base": 0.95},
    {"checkpoint": "step-000200", "step": 200, "dino": 0.55, "clip_i": 0.78, "clip_t": 0.29, "class_dino": 0.25,
     "class_dino_base": 0.88},
    {"checkpoint": "step-000400", "step": 400, "dino": 0.62, "clip_i": 0.82, "clip_t": 0.26, "class_dino": 0.31,
     "class_dino_base": 0.80},
]


def test_tick_spacing_is_one_two_or_five_times_a_power_of_ten():
    assert [nice_step(x) for x in (0.013, 0.03, 0.3, 0.07, 1.0)] == [0.02, 0.05, 0.5, 0.1, 1.0]
    # values span 0.20..0.95, padded by 8% of 0.75 each side: 0.14..1.01; an eighth of that is 0.109 -> ticks of 0.2
    axes = axes_for(ROWS, 0.28)
    assert (round(axes.y_min, 6), round(axes.y_max, 6)) == (0.14, 1.01)
    assert axes.y_ticks() == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_every_point_is_drawn_in_its_series_colour_at_its_value():
    image = plot_metrics(ROWS, "finetune eval: test", floor=0.28, best_step=200)
    assert image.size == (WIDTH, HEIGHT)
    axes = axes_for(ROWS, 0.28)
    for key, (_, colour) in SERIES.items():
        for row in ROWS:
            assert image.getpixel((axes.x(row["step"]), axes.y(row[key]))) == colour, (key, row["step"])
    # each colour also appears in the legend, right of the plot area, and the axis labels are drawn in dark grey
    legend = image.crop((740, 0, WIDTH, HEIGHT))
    colours = {c for _, c in legend.getcolors(maxcolors=100000)}
    assert all(colour in colours for _, colour in SERIES.values())
    below = image.crop((0, 495, WIDTH, HEIGHT)).convert("L")
    assert below.getextrema()[0] < 100  # tick labels and the axis title


def test_contact_sheet_is_prompts_by_seeds_with_the_images_unchanged():
    images = [Image.new("RGB", (64, 64), (10 * i, 255 - 10 * i, 3 * i)) for i in range(6)]
    sheet = contact_sheet(images, ["a sks dog in the jungle", "a red sks dog", "a wet sks dog"], [0, 1], "step-2")
    assert sheet.size == (LABEL_WIDTH + 2 * 64, HEADER + 3 * 64)
    for p in range(3):
        for k in range(2):
            left, top = LABEL_WIDTH + 64 * k, HEADER + 64 * p
            cell = sheet.crop((left, top, left + 64, top + 64))
            assert cell.tobytes() == images[2 * p + k].tobytes()
    assert sheet.crop((0, HEADER, LABEL_WIDTH, HEADER + 64)).convert("L").getextrema()[0] < 100  # the prompt text
