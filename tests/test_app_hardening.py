"""The web app under a fuzzer and a hostile page (issue 20): no 5xx, bounded decoding, headers, an honest schema.

A small library of generated photos (FAST features), served by TestClient, and once by a real uvicorn on
127.0.0.1 for schemathesis (``st run --checks all``) to fuzz.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, make_images, serving

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from similar_finder.app import create_app  # noqa: E402

LOCAL = "http://127.0.0.1:8000"


def extract(folder, csv):
    from similar_finder import extract_features

    return extract_features(folder, csv, **FAST)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    for folder in ("a", "b"):
        make_images(root / "photos" / folder, 5, seed=ord(folder), prefix=folder)
    # A PNG under a .jpg name: served as what it is, never as its name says.
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / "photos" / "a" / "really-a-png.jpg", "PNG")
    return extract(root / "photos", root / "f.csv")


@pytest.fixture(scope="module")
def client(library):
    with TestClient(create_app(library), base_url=LOCAL) as client:
        yield client


def jpeg(seed: int = 3, size: int = 48) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(out, "JPEG")
    return out.getvalue()


def one_line_problem(response, *statuses) -> str:
    assert response.status_code in statuses, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, detail
    return detail


# --- 1. every bad request a 4xx with one line -------------------------------------------------------

def test_integers_beyond_any_library_are_422_not_an_overflow(client):
    for params in ({"offset": "9223372036854775808"}, {"offset": str(10**30)}, {"limit": "99999999999999999999"},
                   {"folder": "x" * 5000}):
        one_line_problem(client.get("/api/images", params=params), 422)
    detail = one_line_problem(client.get("/api/similar/0", params={"n": "1000"}), 422)
    assert detail.startswith("n: ")  # says which parameter


def test_long_names_and_a_folder_that_is_a_file_are_refused_with_why(client, library):
    before = sorted(p for p in library.root.rglob("*"))
    cases = [(("x" * 296) + ".jpg", "uploads", "file name is 300 characters"),
             ("ok.jpg", "f" * 300, "folder name is 300 characters"),
             ("ok.jpg", "/".join(["d" * 60] * 5), "folder name is 304 characters"),
             ("ok.jpg", "a/a0000.jpg", "a/a0000.jpg is a file in the library"),
             ("ok.jpg", "a/a0000.jpg/deeper", "a/a0000.jpg is a file in the library")]
    for name, folder, said in cases:
        detail = one_line_problem(client.post("/api/library", files={"file": (name, jpeg())}, data={"folder": folder}),
                                  400)
        assert said in detail, detail
    assert sorted(p for p in library.root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("spelling", ["+1", "%201", "1%20", "-0", "1_0", "01", "%D9%A3", "1.0", "0x1", "１"])
def test_only_the_plain_spelling_of_an_id_names_a_photo(client, spelling):
    for route in ("photo", "similar", "image", "thumb"):
        response = client.get(f"/api/{route}/{spelling}")
        one_line_problem(response, 404, 422)
    assert client.get("/api/photo/1").json()["image_id"] == 1


def test_head_gives_the_headers_of_a_photo_and_a_thumbnail(client, library):
    path = library.root / library.paths[0]
    head = client.head("/api/image/0")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/jpeg" and int(head.headers["content-length"]) == path.stat().st_size
    thumb = client.head("/api/thumb/0")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.head("/api/image/999").status_code == 404


# --- 2. headers and other sites --------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/", "/static/app.js", "/api/info", "/api/thumb/0", "/api/image/0",
                                 "/api/photo/999", "/api/images?offset=-1", "/docs", "/openapi.json"])
def test_security_headers_are_on_every_answer(client, url):
    response = client.get(url)
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp or url == "/docs"  # only Swagger UI's styles need it
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"


def test_the_host_check_answer_carries_them_too(client):
    response = client.get("/api/info", headers={"host": "evil.example"})
    assert response.status_code == 400 and response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("url", ["/api/info", "/api/images", "/api/thumb/0", "/api/image/0", "/api/map",
                                 "/api/similar/0?approach=kmeans", "/api/duplicates", "/api/photo/0"])
def test_another_sites_page_gets_nothing(client, url):
    for headers in ({"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                    {"origin": "https://evil.example"}, {"origin": "null"},
                    {"referer": "https://evil.example/page.html"}, {"referer": "http://127.0.0.1:9999/"}):
        detail = one_line_problem(client.get(url, headers=headers), 403)
        assert "another site" in detail
    own = {"sec-fetch-site": "same-origin", "referer": f"{LOCAL}/", "origin": LOCAL}
    assert client.get(url, headers=own).status_code in (200, 202)
    assert client.get(url, headers={"sec-fetch-site": "none"}).status_code in (200, 202)  # typed in the address bar


def test_photos_are_served_with_their_real_type(client, library):
    row = library.row_of["a/really-a-png.jpg"]
    response = client.get(f"/api/image/{row}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")


# --- 3. decoding bounded by work ----------------------------------------------------------------

def png(width: int, height: int, mode: str = "1") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def test_uploads_over_the_pixel_budget_get_413_with_the_numbers(library):
    with TestClient(create_app(library, max_upload_mp=1), base_url=LOCAL) as small:
        big = png(1200, 1000)
        for url in ("/api/search", "/api/library"):
            detail = one_line_problem(small.post(url, files={"file": ("big.png", big)}), 413)
            assert "big.png is 1200x1000 = 1.2 megapixels, over the upload limit of 1 MP" in detail
        assert small.post("/api/search", files={"file": ("ok.png", png(900, 1000, "RGB"))}).status_code == 200
        assert small.get("/api/info").json()["max_upload_mp"] == 1


def test_an_animated_upload_costs_its_first_frame_only(client, library):
    frames = [Image.new("P", (24, 24), i % 200) for i in range(3000)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], optimize=False, duration=10)
    gif = out.getvalue()
    service = client.app.state.service
    with Image.open(io.BytesIO(gif)) as img:
        assert img.n_frames == 3000
        img.seek(0)
        first = np.asarray(img.convert("RGB"))
    start = time.perf_counter()
    used, pixels = service.check_upload(gif, "many.gif")
    assert pixels == 24 * 24
    took = time.perf_counter() - start
    with Image.open(io.BytesIO(used)) as img:
        assert not getattr(img, "is_animated", False) and np.array_equal(np.asarray(img.convert("RGB")), first)
    assert took < 0.5, f"{took:.2f} s: the frames were decoded or counted"
    assert client.post("/api/search", files={"file": ("many.gif", gif)}).status_code == 200


def test_when_every_decoding_slot_is_taken_an_upload_gets_503_with_retry_after(library):
    app = create_app(library, decode_slots=1, decode_wait_s=0.3)
    with TestClient(app, base_url=LOCAL) as busy:
        with app.state.service.decoding("held by the test"):
            response = busy.post("/api/search", files={"file": ("q.jpg", jpeg())})
            detail = one_line_problem(response, 503)
            assert "q.jpg" in detail and int(response.headers["retry-after"]) >= 1
        assert busy.post("/api/search", files={"file": ("q.jpg", jpeg())}).status_code == 200  # the slot is free


def test_decodes_are_admitted_by_pixels_so_one_at_the_budget_decodes_alone(library):
    service = create_app(library, max_upload_mp=1, decode_slots=4, decode_wait_s=0.05).state.service
    with service.decoding("small", 300_000), service.decoding("small too", 300_000):  # side by side
        with pytest.raises(Exception, match="decoding other uploads"):
            with service.decoding("at the budget", 1_000_000):
                pass
    with service.decoding("at the budget", 1_000_000):  # alone, once the others are done
        with pytest.raises(Exception, match="decoding other uploads"):
            with service.decoding("tiny", 10):
                pass


# --- 4. a missing or damaged photo affects only itself ---------------------------------------------

def test_a_deleted_and_a_damaged_photo_drop_out_and_the_rest_still_answer(tmp_path):
    make_images(tmp_path / "photos", 8, seed=4)
    photos = tmp_path / "photos"
    shutil.copy(photos / "img0000.jpg", photos / "copy.jpg")  # a duplicate pair that survives
    shutil.copy(photos / "img0001.jpg", photos / "copy1.jpg")  # and one whose original is deleted below
    library = extract(photos, tmp_path / "f.csv")
    gone, damaged = "img0001.jpg", "img0002.jpg"
    with TestClient(create_app(library), base_url=LOCAL) as client:
        (photos / gone).unlink()
        (photos / damaged).write_bytes(b"\xff\xd8 no longer a photo")
        for approach in ("color", "duplicates", "cosine"):
            body = client.get(f"/api/similar/{library.row_of['img0003.jpg']}",
                              params={"approach": approach, "n": 9}).json()
            assert gone not in [r["path"] for r in body["results"]], approach
            if approach != "cosine":  # cosine has the features: only the file that is gone drops out
                assert damaged not in [r["path"] for r in body["results"]]
                assert gone in body["note"] and damaged in body["note"] and "extraction again" in body["note"]
        assert len(client.get(f"/api/similar/{library.row_of['img0003.jpg']}",
                              params={"approach": "color", "n": 9}).json()["results"]) > 0
        dups = client.get("/api/duplicates")
        assert dups.status_code == 200, dups.text
        groups = [[p["path"] for p in g] for g in dups.json()["groups"]]
        assert groups == [["img0000.jpg", "copy.jpg"]]  # the older file kept first; copy1.jpg lost its pair
        assert gone in dups.json()["note"]
        detail = one_line_problem(client.get(f"/api/similar/{library.row_of[gone]}", params={"approach": "color"}),
                                  404)
        assert "gone" in detail
        assert client.get(f"/api/thumb/{library.row_of[gone]}").status_code == 404


# --- 5. /docs offline ------------------------------------------------------------------------------

def test_docs_come_from_files_installed_with_the_project(client):
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources  # nothing from a CDN
    assert "<script>" not in page.text  # no inline script: the policy allows none
    for source in sources:
        assert client.get(source).status_code == 200, source


# --- 6. an honest schema -----------------------------------------------------------------------------

def test_every_route_documents_its_answers(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            takes = operation.get("parameters") or operation.get("requestBody")
            assert {"200", "400", "403", *(["422"] if takes else [])} <= codes, (method, path, codes)
            ok = operation["responses"]["200"]["content"]
            assert any(c.get("schema") for c in ok.values()) or path.startswith(("/api/image", "/api/thumb")), path
    assert "head" in spec["paths"]["/api/image/{image_id}"] and "202" in spec["paths"]["/api/map"]["get"]["responses"]
    assert {"413", "503"} <= set(spec["paths"]["/api/search"]["post"]["responses"])


SCHEMATHESIS_CONFIG = """
[[operations]]
include-path-regex = "^/api/(search|library)$"
# What makes an upload usable (a decodable photo within the pixel budget) cannot be said in a schema: a
# schema-valid upload that is not a photo is answered 400, over the budget 413, with every slot busy 503.
checks.positive_data_acceptance.expected-statuses = [200, 400, 403, 404, 409, 413, 429, 503]
"""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(library, tmp_path):
    pytest.importorskip("schemathesis")
    # The fuzzer adds photos: it gets a library of its own.
    shutil.copytree(library.root, tmp_path / "photos")
    fuzzed = extract(tmp_path / "photos", tmp_path / "f.csv")
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    with serving(create_app(fuzzed)) as url:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"),
             "--no-color", "run", f"{url}openapi.json", "--checks", "all",
             "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--seed", "20",
             "--request-timeout", "20"],
            capture_output=True, text=True, timeout=240)
    report = run.stdout + run.stderr
    print(report[-3000:])
    assert run.returncode == 0, report[-8000:]
    tested = re.search(r"Tested: (\d+)", report)
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert tested and int(tested.group(1)) >= 12, report[-3000:]
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 200, report[-3000:]


# --- 7. the maps off the request -------------------------------------------------------------------

def test_the_map_is_computed_in_the_background_and_polled(tmp_path):
    make_images(tmp_path / "photos", 8, seed=7)
    library = extract(tmp_path / "photos", tmp_path / "f.csv")
    app = create_app(library)
    service = app.state.service
    release, calls = threading.Event(), []
    real = service._compute_map

    def slow(library, method):  # as a t-SNE of thousands of photos: held until the test lets it finish
        calls.append(method)
        release.wait(30)
        return real(library, method)

    service._compute_map = slow
    with TestClient(app, base_url=LOCAL) as client:
        for _ in range(3):
            start = time.perf_counter()
            response = client.get("/api/map")
            assert time.perf_counter() - start < 2  # no request waits for the map
            assert response.status_code == 202 and response.json()["status"] == "computing"
            assert int(response.headers["retry-after"]) >= 1
        assert calls == ["tsne"]  # computed once, however often asked
        release.set()
        deadline = time.monotonic() + 60
        while (response := client.get("/api/map")).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert response.status_code == 200 and response.json()["shown"] == 8 and calls == ["tsne"]
