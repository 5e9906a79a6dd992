"""The local web app: browse a photo library, click or drop a photo, see the similar ones.

``similar-finder app [IMAGES_DIR] [--features-file CSV] [--host 127.0.0.1] [--port 8000]
[--originals DIR] [--open]`` (also ``python -m similar_finder app``) serves the page at
``http://127.0.0.1:8000/``. With no folder it serves the embedded demo library;
with a folder it extracts its features first (incrementally); with only
``--features-file`` it serves that library as it is.

``create_app(library)`` is the FastAPI application: the page (plain HTML, CSS
and JavaScript from ``static/``, no build step, nothing from the internet) and
the JSON API under ``/api/`` that the page uses, documented at ``/docs``.
Every answer comes from one :class:`~similar_finder.service.LibraryService`.
"""
import json
import logging
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit

# FastAPI reads the endpoints' annotations at run time: these names must be real, not strings.
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from . import __version__
from ._io import DATA_DIR
from .demo import ensure_demo_library
from .descriptors import DUPLICATE_BITS
from .embedding import model_for
from .errors import SimilarFinderError
from .features import extract_features
from .library import as_library, open_library
from .service import (APPROACHES, DEFAULT_MAX_UPLOAD, DEFAULT_MAX_UPLOAD_MP, MAX_FOLDER, MAX_ID_DIGITS, Busy,
                      Computing, LibraryService, NotFound, UploadTooLarge)

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
_CHUNK = 1 << 20
MAX_OFFSET = 10**9  # far beyond any library, far below SQLite's 64-bit integers (9223372036854775808 was a 500)
# A photo is named only by its row, spelled plainly: "+1", "01", "1_0" or "٣" are not aliases of other photos.
IMAGE_ID = PathParam(pattern=rf"^(0|[1-9][0-9]{{0,{MAX_ID_DIGITS - 1}}})$",
                     description="the photo's row in the library: a plain non-negative integer (0, 1, 2, ...)",
                     examples=["0"])


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# Sent with every answer. The page is served by the app itself (scripts and styles from /static/, photos and
# thumbnails from /api/, uploads previewed as blob: URLs); nothing else may load, and no other site may frame it.
CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
# Swagger UI (/docs, from the fastapi-offline package) draws its icons as data: URLs and sets inline styles.
CSP_DOCS = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"), (b"cross-origin-resource-policy", b"same-origin")]
CROSS_SITE = "refused: the request comes from another site"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 as it arrives, before anything parses or spools it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received, refused, started = 0, False, False

        async def counted():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = True
                raise _TooLarge
            return message

        async def unless_refused(message):
            nonlocal started
            if not refused:
                started = True
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except _TooLarge:
            pass  # the app may also have turned it into an error of its own, which is not sent
        if refused and not started:
            await self._refuse(send)

    async def _refuse(self, send):
        await _send_json(send, 413, f"the upload is over the limit of {self.limit / 2**20:.0f} MB")


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _from_another_site(headers: dict, host: str | None) -> bool:
    """Whether a browser says this request was made by a page of another origin."""
    site = headers.get(b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):  # "none": typed or bookmarked
        return True
    for name in (b"origin", b"referer"):
        value = headers.get(name)
        if value is not None and urlsplit(value.decode("latin-1")).netloc != host:  # "null" too: a sandboxed page
            return True
    return False


class Guard:
    """The outermost layer: security headers on every answer, and nothing for another site's pages.

    Every ``/api/`` request (each costs work or reveals the library: the map, K-Means, thumbnails, photos) and
    every request that could change something (not GET/HEAD/OPTIONS) is refused with 403 when the browser says it
    comes from another site (``Sec-Fetch-Site``, a foreign ``Origin`` or ``Referer``). Clients that are not
    browsers (curl, scripts) send none of these and cannot be tricked into sending them.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        csp = (CSP_DOCS if path == "/docs" else CSP).encode()

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS, (b"content-security-policy", csp)]}
            await send(message)

        headers = dict(scope["headers"])
        guarded = path.startswith("/api/") or scope["method"] not in ("GET", "HEAD", "OPTIONS")
        if guarded and _from_another_site(headers, (headers.get(b"host") or b"").decode("latin-1")):
            return await _send_json(with_headers, 403, CROSS_SITE)
        await self.app(scope, receive, with_headers)


_OURS = {k for k, _ in SECURITY_HEADERS} | {b"content-security-policy"}


# --- the answers' shapes (the OpenAPI schema at /openapi.json, checked by tests/test_app_hardening.py) ---------

class Problem(BaseModel):
    detail: str = Field(description="one line: what is wrong and what to do")


class Folder(BaseModel):
    folder: str
    photos: int


class Info(BaseModel):
    images: int
    skipped: int
    backbone: str | None
    dim: int
    features_file: str
    images_root: str
    folders: list[Folder]
    approaches: dict[str, str]
    originals: bool
    max_upload_mb: float
    max_upload_mp: float


class Photo(BaseModel):
    image_id: int
    path: str
    folder: str
    sha256: str
    bytes: int | None
    width: int | None
    height: int | None
    taken: str | None = Field(description="EXIF date taken, ISO 8601")
    camera: str | None
    status: str
    detail: str | None
    cluster: int | None = Field(description="K-Means cluster, once K-Means is fitted")


class PhotoFacts(Photo):
    original: bool = Field(description="whether --originals holds a copy of it")


class Page(BaseModel):
    total: int
    offset: int
    images: list[Photo]


class Result(BaseModel):
    image_id: int
    path: str
    distance: float
    cluster: int | None = None
    relation: str | None = None  # near-duplicates: how it differs from the query (cropped, mirrored, ...)


class QueryPhoto(BaseModel):
    image_id: int
    path: str
    folder: str
    width: int | None
    height: int | None


class Upload(BaseModel):
    filename: str | None
    bytes: int


class Similar(BaseModel):
    query: QueryPhoto | Upload
    approach: str
    results: list[Result]
    message: str | None = Field(description='"No similar images found" when there are no results')
    reason: str | None = Field(description="why there are none")
    note: str | None = Field(description="photos left out because their files are gone or damaged")


class Member(BaseModel):
    image_id: int
    path: str
    keep: bool = False          # the member to keep (most pixels, least compressed)
    relation: str | None = None  # how it differs from the kept one: cropped, mirrored, resized, ...


class Duplicates(BaseModel):
    groups: list[list[Member]]
    message: str | None
    note: str | None


class Point(BaseModel):
    image_id: int
    path: str
    x: float
    y: float


class Map(BaseModel):
    method: str
    total: int
    shown: int
    sampled: bool
    points: list[Point]


class Pending(BaseModel):
    status: str = Field(description='"computing"')
    detail: str


def _statuses(*codes: int) -> dict:
    """The ``responses=`` of a route: each status it can give, with its meaning."""
    return {code: {"model": Problem, "description": MEANINGS[code]} for code in codes}


MEANINGS = {
    400: "the request cannot be answered as asked (the one-line `detail` says why), or the Host is not this machine",
    403: "refused: the request comes from another site's page",
    404: "no such photo (an id is a plain row number), or its file is gone, damaged or outside the library",
    413: "the upload is over the size cap or the pixel budget",
    422: "a parameter is missing or out of its range",
    503: "every decoding slot is busy; try again after Retry-After seconds",
}
COMMON = (400, 403, 422)
IMAGE = {"content": {"image/jpeg": {}, "image/png": {}, "image/gif": {}, "image/webp": {}, "image/bmp": {}},
         "description": "the photo, with its real type"}


def create_app(library, *, originals=None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_upload_mp: float = DEFAULT_MAX_UPLOAD_MP, allowed_hosts=LOCAL_HOSTS, **service_options):
    """The FastAPI app serving ``library`` (a :class:`~similar_finder.library.Library` or its CSV).

    Only requests naming one of ``allowed_hosts`` are served (so a web page whose
    name was pointed at 127.0.0.1 cannot read the library), and no page of another
    site may call the API or post anything (so no web page can read the library,
    add photos or make the server work); see :class:`Guard`.
    ``service_options`` go to :class:`~similar_finder.service.LibraryService`
    (``decode_slots``, ``decode_wait_s``).
    """
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    service = LibraryService(as_library(library), originals=originals, max_upload_bytes=max_upload_bytes,
                             max_upload_mp=max_upload_mp, **service_options)
    app = FastAPI(title="similar_finder", version=__version__, docs_url=None, redoc_url=None,
                  description="Browse a photo library and find similar photos. Every photo is named by its "
                              "`image_id` (its row in the library); a path in a request is never opened.")
    app.state.service = service
    hosts = list(allowed_hosts)
    app.add_middleware(BodyLimit, limit=service.max_upload_bytes + _CHUNK)  # multipart framing on top of the photo
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(Guard)  # added last: outermost, so even the Host check's answer carries the headers
    approach_names = "|".join(APPROACHES)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Computing)
    async def computing(request: Request, exc: Computing):
        return JSONResponse({"status": "computing", "detail": str(exc)}, status_code=202,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # One line like every other error: "n: Input should be less than or equal to 100".
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return JSONResponse({"detail": problems or "the request is malformed"}, status_code=422)

    @app.exception_handler(SimilarFinderError)
    async def bad_request(request: Request, exc: SimilarFinderError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def answer(result, query: dict) -> dict:
        return {"query": query, "approach": result.approach, "results": result.results,
                "message": result.message, "reason": result.reason, "note": result.note}

    def read_upload(file: UploadFile, request: Request) -> bytes:
        return file.file.read(service.max_upload_bytes + 1)  # the body itself is bounded by BodyLimit

    @app.get("/api/info", summary="The library: size, backbone, folders, approaches", response_model=Info,
             responses=_statuses(400, 403))
    def info():
        return service.info()

    @app.get("/api/images", summary="One page of the library's photos, filtered and sorted", response_model=Page,
             responses=_statuses(*COMMON))
    def images(offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(100, ge=1, le=1000),
               folder: str | None = Query(None, max_length=MAX_FOLDER, description="this folder and its subfolders"),
               sort: str = Query("path", pattern="^(path|taken|bytes|pixels|cluster)$"),
               descending: bool = False):
        if sort == "cluster":
            service.kmeans()  # clusters are in the catalog once K-Means is fitted
        return service.images(offset=offset, limit=limit, folder=folder, sort=sort, descending=descending)

    @app.get("/api/photo/{image_id}", summary="One photo's facts (path, size, date taken, camera, cluster)",
             response_model=PhotoFacts, responses=_statuses(*COMMON, 404))
    def photo(image_id: str = IMAGE_ID):
        return service.photo(image_id)

    @app.get("/api/similar/{image_id}", summary="The photos most similar to a library photo", response_model=Similar,
             responses=_statuses(*COMMON, 404))
    def similar(image_id: str = IMAGE_ID, n: int = Query(5, ge=1, le=100),
                approach: str = Query("cosine", pattern=f"^({approach_names})$")):
        result = service.similar(image_id, n, approach)
        return answer(result, result.query)

    @app.post("/api/search", summary="The library photos most similar to an uploaded photo (not stored)",
              response_model=Similar, responses=_statuses(*COMMON, 413, 503))
    def search(request: Request, file: UploadFile = File(...), n: int = Form(5, ge=1, le=100),
               approach: str = Form("cosine", pattern=f"^({approach_names})$")):
        data = read_upload(file, request)
        result = service.search(data, n, approach, filename=file.filename or "upload")
        return answer(result, {"filename": file.filename, "bytes": len(data)})

    @app.post("/api/library", summary="Add an uploaded photo to the library (saved under the images folder)",
              response_model=PhotoFacts, responses=_statuses(*COMMON, 413, 503))
    def add(request: Request, file: UploadFile = File(...), folder: str = Form("uploads")):
        return service.add_photo(read_upload(file, request), file.filename or "upload.jpg", folder)

    @app.get("/api/duplicates", summary="Groups of near-identical photos, largest first", response_model=Duplicates,
             responses=_statuses(*COMMON))
    def duplicates(max_distance: int | None = Query(None, ge=0, le=32, description=(
            f"the pure perceptual-hash answer: bits of 64 apart still a copy (e.g. {DUPLICATE_BITS}); left out, "
            "copies are verified by local features"))):
        return service.duplicates(max_distance)

    @app.get("/api/map", summary="The library's 2-D map (t-SNE or UMAP), sampled above a few thousand photos",
             response_model=Map, responses={
                 **_statuses(*COMMON),
                 202: {"model": Pending, "description": "being computed in the background: ask again after "
                                                        "Retry-After seconds (the first request starts it)"}})
    def library_map(method: str = Query("tsne", pattern="^(tsne|umap)$")):
        return service.map(method)

    # HEAD: the headers alone (type, size), as a GET would send them.
    @app.api_route("/api/image/{image_id}", methods=["GET", "HEAD"], response_class=FileResponse,
                   summary="The photo itself (its original with --originals, when there)",
                   responses={200: IMAGE, **_statuses(*COMMON, 404)})
    def image(image_id: str = IMAGE_ID, download: bool = False, original: bool = True):
        path = service.image_file(image_id, original=original)
        name = Path(service.photo(image_id)["path"]).name if download else None
        # Revalidated on every view (answered 304 when unchanged): an id may name another photo after an add.
        # The type is the content's (a ".jpg" that is really a PNG is sent as a PNG), never guessed by the browser.
        return FileResponse(path, filename=name, content_disposition_type="attachment" if download else "inline",
                            media_type=service.media_type(path) or "application/octet-stream",
                            headers={"Cache-Control": "private, no-cache"})

    @app.api_route("/api/thumb/{image_id}", methods=["GET", "HEAD"], response_class=FileResponse,
                   summary="A thumbnail (JPEG, 256 px), made once and cached on disk",
                   responses={200: {"content": {"image/jpeg": {}}, "description": "the thumbnail"},
                              **_statuses(*COMMON, 404)})
    def thumb(image_id: str = IMAGE_ID):
        return FileResponse(service.thumbnail(image_id), media_type="image/jpeg",
                            headers={"Cache-Control": "private, no-cache"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs():
        # Swagger UI from the fastapi-offline package, served here: nothing from a CDN, works offline.
        return HTMLResponse((STATIC / "docs.html").read_text())

    swagger = _swagger_ui_files()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")
    else:
        log.warning("/docs needs the fastapi-offline package (Swagger UI's files): pip install 'similar_finder[app]'")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi():
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                # One route serves GET and HEAD, so FastAPI names both operations alike: HEAD's is renamed below.
                warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
                schema = FastAPI.openapi(app)
            for operations in schema["paths"].values():
                if "head" in operations and "get" in operations:
                    operations["head"]["operationId"] = operations["get"]["operationId"].removesuffix("_get") + "_head"
        return app.openapi_schema

    app.openapi = openapi
    return app


def _swagger_ui_files() -> Path | None:
    """Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes) as the PyPI package fastapi-offline ships it.

    Only its folder of files is used, found without importing the package.
    """
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "static" / "swagger-ui-bundle.js").is_file():
            return Path(folder) / "static"
    return None


def serve(images_dir=None, *, features_file=None, host: str = "127.0.0.1", port: int = 8000, originals=None,
          open_browser: bool = False, max_upload_mb: float = 25, max_upload_mp: float = DEFAULT_MAX_UPLOAD_MP,
          progress: bool = True, watch: bool = False, **extract_kwargs) -> None:
    """Extract (if given a folder, or nothing: the demo library), then serve the app until Ctrl-C; ``watch``
    follows the folder while it runs (photos added, changed, moved or removed)."""
    import uvicorn

    if images_dir is None and features_file is not None:
        library = open_library(features_file)
    else:
        folder = Path(images_dir) if images_dir is not None else ensure_demo_library()
        csv = features_file or DATA_DIR / "libraries" / f"{folder.resolve().name}.csv"
        library = extract_features(folder, csv, extract_kwargs.pop("backbone", None), progress=progress,
                                   **extract_kwargs)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the library's photos become visible to every machine that can reach this one",
                    host)
    hosts = [*LOCAL_HOSTS, host] if host not in ("0.0.0.0", "::") else ["*"]
    app = create_app(library, originals=originals, max_upload_bytes=int(max_upload_mb * 2**20),
                     max_upload_mp=max_upload_mp, allowed_hosts=hosts)
    _warm(app.state.service)
    _return_freed_memory()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"similar_finder: {len(library)} photos from {library.root}\nopen {url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    stop = threading.Event()
    if watch:
        app.state.service.watch(stop)
        print(f"following {library.root}: photos added, changed or removed there join the library", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop.set()


def _return_freed_memory() -> None:
    """Large blocks straight from the OS and back to it when freed (glibc only; elsewhere nothing changes).

    A decoded upload is ~190 MB at the pixel budget, in Pillow's 16 MB blocks. glibc's default raises its mmap
    threshold past that after the first free, so later blocks come from per-thread heaps that keep them: four
    uploads on four server threads held 630 MB after they were answered. A fixed 4 MB threshold keeps the peak
    at one decode's worth (bench/upload_bench.py).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; setting it also turns off glibc's dynamic threshold
    except (OSError, AttributeError):
        pass


def _warm(service: LibraryService) -> None:
    """Build the model and the default approach now, so the first click and upload are quick."""
    if service.library.config:
        model_for(service.library.meta)
    service.approach("cosine")

