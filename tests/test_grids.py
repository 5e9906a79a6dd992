"""The pictures run_all draws: grids composed with Pillow, maps whose panels show their colours."""
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.offsetbox import AnnotationBbox
from PIL import Image

from similar_finder.images import class_of
from similar_finder.plots import GRID_PAD, GRID_RIGHT, GRID_WRONG, THUMB, recommendation_grid, save_grid, tsne_map


def _photos(food_db):
    return sorted(p.relative_to(food_db).as_posix() for p in food_db.rglob("*") if p.is_file())


def _near(pixel, colour, tolerance=40):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, Image.new("RGB", (1, 1), colour).getpixel((0, 0))))


def test_a_grid_frames_results_by_class_and_says_when_there_is_none(food_db, tmp_path):
    photos = _photos(food_db)
    query = photos[0]
    same = [p for p in photos if class_of(p) == class_of(query)][1:3]
    other = [p for p in photos if class_of(p) != class_of(query)][:2]
    results = pd.DataFrame({"path": same + other, "distance": [0.1, 0.2, 0.3, 0.4]})
    grid = recommendation_grid(food_db / query, results, food_db, title="t", query_label=class_of(query), classes=True)
    assert isinstance(grid, Image.Image) and grid.width > 4 * THUMB
    # Each result's frame, 1 px outside its tile's left edge, in the middle of its height.
    left = GRID_PAD + 2 * THUMB + 2 * GRID_PAD
    y = grid.height - GRID_PAD - THUMB - (2 * THUMB - THUMB) // 2 + THUMB // 2
    frames = [grid.getpixel((left + i * (THUMB + GRID_PAD) - 2, y)) for i in range(4)]
    assert [_near(f, GRID_RIGHT) for f in frames] == [True, True, False, False], frames
    assert [_near(f, GRID_WRONG) for f in frames] == [False, False, True, True], frames

    empty = recommendation_grid(food_db / query, results.iloc[:0], food_db)
    panel = np.asarray(empty)[:, left:]
    reddish = (panel[..., 0] > 150) & (panel[..., 1] < 90) & (panel[..., 2] < 90)
    assert reddish.sum() > 50  # the message is written where the results would be

    assert save_grid(grid, tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert save_grid(grid, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_map_thumbnails_are_framed_in_each_panels_colour(food_db):
    photos = _photos(food_db)[:12]
    points = np.random.default_rng(0).random((len(photos), 2))
    clusters = np.array([i % 2 for i in range(len(photos))])
    classes = np.array([class_of(p) for p in photos])
    fig = tsne_map(points, {"K-Means cluster": clusters, "class": classes}, paths=photos, images_root=food_db,
                   thumbnails=len(photos))
    edges = []
    for ax in fig.axes:
        boxes = [a for a in ax.artists if isinstance(a, AnnotationBbox)]
        assert len(boxes) == len(photos)
        edges.append([to_rgba(b.patch.get_edgecolor()) for b in boxes])
    # Left: two colours, by cluster; right: one colour per class. The panels differ as their points do.
    assert len(set(edges[0])) == 2 and len(set(edges[1])) == len(set(classes)) and edges[0] != edges[1]
