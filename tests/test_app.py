"""The web app's JSON API, through FastAPI's TestClient, on real features of the shared food photos."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, FOOD_QUERIES, make_images

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from similar_finder.app import create_app  # noqa: E402
from similar_finder.images import class_of  # noqa: E402
from similar_finder.library import Library  # noqa: E402
from similar_finder.recommender import NO_RESULTS  # noqa: E402

LOCAL = "http://127.0.0.1:8000"  # the app answers only requests that name this machine


@pytest.fixture(scope="module")
def library(food_features):
    return Library(food_features)


@pytest.fixture(scope="module")
def client(library):
    with TestClient(create_app(library), base_url=LOCAL) as client:
        yield client


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=quality)
    return out.getvalue()


def store_stamps(library: Library) -> list:
    files = library.files
    return [(p.stat().st_size, p.stat().st_mtime_ns) for p in (files.csv, files.npy, files.meta, files.audit)]


def test_a_library_photo_gets_its_class_first_and_never_itself(client, library):
    first_same_class = 0
    for image_id, path in enumerate(library.paths):
        body = client.get(f"/api/similar/{image_id}", params={"n": 5}).json()
        assert body["query"]["image_id"] == image_id and body["query"]["path"] == path
        ids = [r["image_id"] for r in body["results"]]
        assert image_id not in ids, f"{path} is among its own results"
        assert [r["path"] for r in body["results"]] == [library.paths[i] for i in ids]
        distances = [r["distance"] for r in body["results"]]
        assert distances == sorted(distances)
        first_same_class += bool(ids) and class_of(library.paths[ids[0]]) == class_of(path)
    # Leave-one-out precision@1 of these features is about 0.97 on the 36 photos.
    assert first_same_class >= 33


@pytest.mark.parametrize("approach", ["kmeans", "color", "duplicates"])
def test_every_approach_answers_in_the_same_shape_and_never_with_the_photo_itself(client, approach):
    body = client.get("/api/similar/7", params={"n": 4, "approach": approach}).json()
    assert body["approach"] == approach
    assert 7 not in [r["image_id"] for r in body["results"]]
    if approach == "kmeans":  # K-Means always answers, with the query's cluster
        assert len(body["results"]) == 4 and len({r["cluster"] for r in body["results"]}) == 1
    if approach == "duplicates":  # the food photos are all different photos
        assert body["results"] == [] and body["message"] == "No near-duplicates found"


def test_an_uploaded_food_photo_finds_its_class(client, library):
    for name, label in (("burger_test.jpeg", "burger"), ("asparagus_test.jpg", "asparagus")):
        data = (FOOD_QUERIES / name).read_bytes()
        response = client.post("/api/search", files={"file": (name, data, "image/jpeg")}, data={"n": "3"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["query"] == {"filename": name, "bytes": len(data)}
        assert [class_of(r["path"]) for r in body["results"]][:1] == [label]


def test_an_unrelated_photo_gets_the_message_and_why(client):
    import skimage.data

    data = jpeg_bytes(skimage.data.astronaut())
    body = client.post("/api/search", files={"file": ("astronaut.jpg", data, "image/jpeg")}).json()
    assert body["results"] == [] and body["message"] == NO_RESULTS
    assert "farther from every library photo" in body["reason"]


def test_bad_uploads_get_400_with_one_line_and_change_nothing(client, library, tmp_path):
    before = store_stamps(library)
    truncated = (FOOD_QUERIES / "burger_test.jpeg").read_bytes()[:600]
    cases = {"notes.txt": b"this is not a photo\n", "burger.jpg": truncated, "empty.png": b""}
    for name, data in cases.items():
        response = client.post("/api/search", files={"file": (name, data, "application/octet-stream")})
        assert response.status_code == 400, (name, response.text)
        detail = response.json()["detail"]
        assert name in detail and "\n" not in detail
    assert "not an image" in client.post("/api/search", files={"file": ("n.txt", b"text")}).json()["detail"]
    assert "truncated" in client.post("/api/search", files={"file": ("t.jpg", truncated)}).json()["detail"]
    assert client.get("/api/similar/0").status_code == 200  # the server keeps serving
    assert store_stamps(library) == before and len(Library(library.files.csv)) == len(library)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(client):
    from PIL import Image as PILImage

    bomb = io.BytesIO()
    PILImage.new("1", (12_000, 10_000)).save(bomb, "PNG")  # 120 megapixels in a few kilobytes
    assert len(bomb.getvalue()) < 100_000
    response = client.post("/api/search", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    # Over the upload pixel budget (50 MP), said with the numbers, from the header alone.
    assert response.status_code == 413, response.text
    assert "12000x10000 = 120.0 megapixels" in response.json()["detail"] and "50 MP" in response.json()["detail"]


def test_other_hosts_and_cross_site_posts_are_refused(client, library):
    # A page whose name was pointed at 127.0.0.1 (DNS rebinding) cannot read the library.
    assert client.get("/api/images", headers={"host": "evil.example"}).status_code == 400
    data = (FOOD_QUERIES / "burger_test.jpeg").read_bytes()
    files = {"file": ("q.jpg", data, "image/jpeg")}
    # Another site's page cannot make the server work or add photos; the app's own page can.
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
        for url in ("/api/search", "/api/library"):
            response = client.post(url, files=files, headers=headers)
            assert response.status_code == 403 and "another site" in response.json()["detail"]
    own = client.post("/api/search", files=files, headers={"origin": LOCAL, "sec-fetch-site": "same-origin"})
    assert own.status_code == 200
    assert len(Library(library.files.csv)) == 36


def test_a_streamed_body_over_the_cap_is_cut_off_as_it_arrives(library):
    with TestClient(create_app(library, max_upload_bytes=2000), base_url=LOCAL) as small:
        sent = []

        def body():  # no content-length: the cap is enforced on what arrives
            for _ in range(64):
                sent.append(1)
                yield b"x" * 65_536

        response = small.post("/api/search", content=body(),
                              headers={"content-type": "multipart/form-data; boundary=abc"})
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]


def test_uploads_over_the_cap_are_refused(library):
    with TestClient(create_app(library, max_upload_bytes=2000), base_url=LOCAL) as small:
        data = (FOOD_QUERIES / "burger_test.jpeg").read_bytes()
        assert len(data) > 2000
        response = small.post("/api/search", files={"file": ("big.jpg", data, "image/jpeg")})
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]


@pytest.mark.parametrize("url", [
    "/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/../../etc/passwd", "/api/thumb/%2Fetc%2Fpasswd",
    "/api/image/999", "/api/thumb/-1", "/api/similar/abc", "/api/photo/36", "/api/image/1.5",
])
def test_paths_and_unknown_ids_are_404(client, url):
    response = client.get(url)
    assert response.status_code in (404, 422), response.text  # 422: not even spelled as an id
    assert "root:" not in response.text


def test_a_symlink_leading_outside_the_library_is_not_served(tmp_path):
    outside = make_images(tmp_path / "outside", 1, seed=5)[0]
    make_images(tmp_path / "photos", 5)
    (tmp_path / "photos" / "link.jpg").symlink_to(outside)
    from similar_finder import extract_features

    library = extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST)
    link_id = library.row_of["link.jpg"]
    with TestClient(create_app(library), base_url=LOCAL) as client:
        assert client.get("/api/image/0").status_code == 200
        for url in (f"/api/image/{link_id}", f"/api/thumb/{link_id}"):
            response = client.get(url)
            assert response.status_code == 404 and "outside the library" in response.json()["detail"]


def test_images_are_paginated_filtered_and_sorted_from_the_catalog(client, library):
    body = client.get("/api/images", params={"limit": 10}).json()
    assert body["total"] == 36 and [p["path"] for p in body["images"]] == library.paths[:10]
    page = client.get("/api/images", params={"offset": 30, "limit": 10}).json()["images"]
    assert [p["image_id"] for p in page] == list(range(30, 36))
    burgers = client.get("/api/images", params={"folder": "burger"}).json()
    assert burgers["total"] == 6 and {class_of(p["path"]) for p in burgers["images"]} == {"burger"}
    by_size = client.get("/api/images", params={"sort": "bytes", "descending": "true", "limit": 36}).json()["images"]
    sizes = [p["bytes"] for p in by_size]
    assert sizes == sorted(sizes, reverse=True)
    assert {p["width"] for p in by_size} == {Image.open(library.root / p["path"]).size[0] for p in by_size}
    assert client.get("/api/images", params={"sort": "colour"}).status_code == 422


def test_clusters_reach_the_catalog_once_kmeans_is_fitted(client):
    by_cluster = client.get("/api/images", params={"sort": "cluster", "limit": 36}).json()["images"]
    clusters = [p["cluster"] for p in by_cluster]
    assert None not in clusters and clusters == sorted(clusters) and len(set(clusters)) >= 2


def test_thumbnails_are_small_jpegs_made_once(client, library):
    response = client.get("/api/thumb/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    cached = list(library.files.thumbnails.rglob("*.jpg"))
    assert cached
    stamp = cached[0].stat().st_mtime_ns
    client.get("/api/thumb/3")
    assert cached[0].stat().st_mtime_ns == stamp


def map_when_ready(client, method="tsne", timeout=120):
    """The map, asked again while the server answers 202 "computing" (as the page does)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/api/map", params={"method": method})
        if response.status_code != 202:
            assert response.status_code == 200, response.text
            return response.json()
        assert response.json()["status"] == "computing" and int(response.headers["retry-after"]) >= 1
        assert time.monotonic() < deadline, "the map was never computed"
        time.sleep(0.2)


def test_the_map_has_every_photo_in_the_unit_square(client):
    body = map_when_ready(client)
    assert body["total"] == body["shown"] == 36 and body["sampled"] is False
    xy = np.array([(p["x"], p["y"]) for p in body["points"]])
    assert xy.min() >= 0 and xy.max() <= 1 and len({p["image_id"] for p in body["points"]}) == 36
    assert client.get("/api/map").json() == body  # computed once


def test_duplicates_finds_copies_largest_group_first(tmp_path):
    from similar_finder import extract_features

    photos = make_images(tmp_path / "photos", 6, size=96)
    original = Image.open(photos[0])
    original.resize((80, 80)).save(tmp_path / "photos" / "copy_small.jpg", quality=70)
    original.save(tmp_path / "photos" / "copy_recompressed.jpg", quality=40)
    Image.open(photos[1]).save(tmp_path / "photos" / "copy_of_1.png")
    library = extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST)
    with TestClient(create_app(library), base_url=LOCAL) as client:
        groups = [[p["path"] for p in g] for g in client.get("/api/duplicates").json()["groups"]]
        assert groups == [["img0000.jpg"] + sorted(["copy_small.jpg", "copy_recompressed.jpg"]),  # the keeper first
                          ["copy_of_1.png", "img0001.jpg"]]  # same pixels, and a PNG is compressed least
        body = client.get(f"/api/similar/{library.row_of['img0000.jpg']}", params={"approach": "duplicates"}).json()
        assert {r["path"] for r in body["results"]} == {"copy_small.jpg", "copy_recompressed.jpg"}


def test_originals_are_served_for_the_large_view_and_download(tmp_path):
    from similar_finder import extract_features

    make_images(tmp_path / "small", 5)
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.full((400, 300, 3), 200, np.uint8)).save(big / "img0002.jpg")
    library = extract_features(tmp_path / "small", tmp_path / "f.csv", **FAST)
    with TestClient(create_app(library, originals=big), base_url=LOCAL) as client:
        assert client.get("/api/photo/2").json()["original"] is True
        assert client.get("/api/photo/1").json()["original"] is False
        assert client.get("/api/image/2").content == (big / "img0002.jpg").read_bytes()
        assert client.get("/api/image/1").content == (tmp_path / "small" / "img0001.jpg").read_bytes()
        download = client.get("/api/image/2", params={"download": "true"})
        assert download.headers["content-disposition"].startswith("attachment") and "img0002.jpg" in \
            download.headers["content-disposition"]


def test_a_photo_is_added_only_when_asked(tmp_path):
    from similar_finder import extract_features

    make_images(tmp_path / "photos", 6)
    library = extract_features(tmp_path / "photos", tmp_path / "f.csv", **FAST)
    new = jpeg_bytes((np.random.default_rng(9).random((48, 48, 3)) * 255).astype(np.uint8))
    with TestClient(create_app(library), base_url=LOCAL) as client:
        assert client.post("/api/search", files={"file": ("new.jpg", new)}).status_code == 200
        assert not (tmp_path / "photos" / "uploads").exists()  # a search stores nothing
        assert client.post("/api/library", files={"file": ("notes.txt", b"hello")}).status_code == 400
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "photos" / "out").symlink_to(tmp_path / "elsewhere")
        for name, folder in ((".hidden.jpg", "uploads"), ("new.jpg", ".private"), ("new.jpg", "a/../../out"),
                             ("new.jpg", "/tmp"), ("new.jpg", "out"), ("new.jpg", "out/deeper")):
            response = client.post("/api/library", files={"file": (name, new)}, data={"folder": folder})
            assert response.status_code == 400, (name, folder, response.text)
        assert sorted(p.name for p in (tmp_path / "photos").rglob("*") if p.is_file()) == \
            [f"img{i:04d}.jpg" for i in range(6)]  # a refused add writes nothing
        assert not list((tmp_path / "elsewhere").iterdir())  # nor anything through a link leading out
        added = client.post("/api/library", files={"file": ("new.jpg", new)}).json()
        assert added["path"].startswith("uploads/new-") and (tmp_path / "photos" / added["path"]).is_file()
        assert client.get("/api/info").json()["images"] == 7
        similar = client.get(f"/api/similar/{added['image_id']}").json()
        assert added["image_id"] not in [r["image_id"] for r in similar["results"]]
    reopened = Library(tmp_path / "f.csv")
    assert len(reopened) == 7 and added["path"] in reopened.paths


def test_concurrent_searches_all_get_the_same_answer(client):
    data = (FOOD_QUERIES / "burger_test.jpeg").read_bytes()
    answers, errors = [], []

    def one():
        try:
            response = client.post("/api/search", files={"file": ("q.jpg", data)}, data={"n": "5"})
            answers.append(tuple(r["image_id"] for r in response.json()["results"]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 8 and len(set(answers)) == 1 and answers[0]


def test_concurrent_similar_queries_batched_together_get_their_own_answers(client, library):
    from concurrent.futures import ThreadPoolExecutor

    def ask(args):
        image_id, n = args
        body = client.get(f"/api/similar/{image_id}", params={"n": n}).json()
        return [(r["image_id"], r["distance"]) for r in body["results"]]

    queries = [(i, 3 + i % 5) for i in range(len(library))]
    alone = [ask(q) for q in queries]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, queries))
    # The same photos in the same order; distances equal but for float rounding (one product, not many).
    assert [[i for i, _ in a] for a in together] == [[i for i, _ in a] for a in alone]
    assert np.allclose([d for a in together for _, d in a], [d for a in alone for _, d in a], atol=1e-5)
    assert all(len(a) <= n for a, (_, n) in zip(alone, queries)) and sum(map(len, alone)) > len(queries)


def test_the_api_is_documented(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/images", "/api/similar/{image_id}", "/api/search", "/api/duplicates", "/api/map",
                 "/api/image/{image_id}", "/api/thumb/{image_id}"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_the_app_command_explains_a_missing_library(tmp_path, capsys):
    from similar_finder.cli import main

    assert main(["app", "--features-file", str(tmp_path / "none.csv")]) == 2
    assert "no features file" in capsys.readouterr().err
