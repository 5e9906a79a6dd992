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
from pathlib import Path
from urllib.parse import urlsplit

# FastAPI reads the endpoints' annotations at run time: these names must be real, not strings.
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from . import __version__
from ._io import DATA_DIR
from .demo import ensure_demo_library
from .descriptors import DUPLICATE_BITS
from .embedding import model_for
from .errors import SimilarFinderError
from .features import extract_features
from .library import as_library, open_library
from .service import APPROACHES, DEFAULT_MAX_UPLOAD, LibraryService, NotFound, UploadTooLarge

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
_CHUNK = 1 << 20


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


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
        body = json.dumps({"detail": f"the upload is over the limit of {self.limit / 2**20:.0f} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(library, *, originals=None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, allowed_hosts=LOCAL_HOSTS):
    """The FastAPI app serving ``library`` (a :class:`~similar_finder.library.Library` or its CSV).

    Only requests naming one of ``allowed_hosts`` are served (so a web page whose
    name was pointed at 127.0.0.1 cannot read the library), and a POST from a
    page of another origin is refused (so no web page can add photos or make the
    server work).
    """
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    service = LibraryService(as_library(library), originals=originals, max_upload_bytes=max_upload_bytes)
    app = FastAPI(title="similar_finder", version=__version__,
                  description="Browse a photo library and find similar photos. Every photo is named by its "
                              "`image_id` (its row in the library); a path in a request is never opened.")
    app.state.service = service
    hosts = list(allowed_hosts)
    app.add_middleware(BodyLimit, limit=service.max_upload_bytes + _CHUNK)  # multipart framing on top of the photo
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    @app.middleware("http")
    async def same_origin_posts(request: Request, call_next):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            site = request.headers.get("sec-fetch-site")
            # Browsers say where a request comes from; other clients (curl, scripts) cannot be tricked into one.
            if (site is not None and site not in ("same-origin", "none")) or \
                    (origin is not None and urlsplit(origin).netloc != request.headers.get("host")):
                return JSONResponse({"detail": "refused: the request comes from another site"}, status_code=403)
        return await call_next(request)
    approach_names = "|".join(APPROACHES)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, exc: UploadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(SimilarFinderError)
    async def bad_request(request: Request, exc: SimilarFinderError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def answer(result, query: dict) -> dict:
        return {"query": query, "approach": result.approach, "results": result.results,
                "message": result.message, "reason": result.reason}

    def read_upload(file: UploadFile, request: Request) -> bytes:
        return file.file.read(service.max_upload_bytes + 1)  # the body itself is bounded by BodyLimit

    @app.get("/api/info", summary="The library: size, backbone, folders, approaches")
    def info():
        return service.info()

    @app.get("/api/images", summary="One page of the library's photos, filtered and sorted")
    def images(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
               folder: str | None = Query(None, description="this folder and its subfolders"),
               sort: str = Query("path", pattern="^(path|taken|bytes|pixels|cluster)$"),
               descending: bool = False):
        if sort == "cluster":
            service.kmeans()  # clusters are in the catalog once K-Means is fitted
        return service.images(offset=offset, limit=limit, folder=folder, sort=sort, descending=descending)

    @app.get("/api/photo/{image_id}", summary="One photo's facts (path, size, date taken, camera, cluster)")
    def photo(image_id: str):
        return service.photo(image_id)

    @app.get("/api/similar/{image_id}", summary="The photos most similar to a library photo")
    def similar(image_id: str, n: int = Query(5, ge=1, le=100),
                approach: str = Query("cosine", pattern=f"^({approach_names})$")):
        result = service.similar(image_id, n, approach)
        return answer(result, result.query)

    @app.post("/api/search", summary="The library photos most similar to an uploaded photo (not stored)")
    def search(request: Request, file: UploadFile = File(...), n: int = Form(5, ge=1, le=100),
               approach: str = Form("cosine", pattern=f"^({approach_names})$")):
        data = read_upload(file, request)
        result = service.search(data, n, approach, filename=file.filename or "upload")
        return answer(result, {"filename": file.filename, "bytes": len(data)})

    @app.post("/api/library", summary="Add an uploaded photo to the library (saved under the images folder)")
    def add(request: Request, file: UploadFile = File(...), folder: str = Form("uploads")):
        return service.add_photo(read_upload(file, request), file.filename or "upload.jpg", folder)

    @app.get("/api/duplicates", summary="Groups of near-identical photos, largest first")
    def duplicates(max_distance: int = Query(DUPLICATE_BITS, ge=0, le=32)):
        groups = service.duplicates(max_distance)
        return {"groups": groups, "message": None if groups else "No near-duplicates found"}

    @app.get("/api/map", summary="The library's 2-D map (t-SNE or UMAP), sampled above a few thousand photos")
    def library_map(method: str = Query("tsne", pattern="^(tsne|umap)$")):
        return service.map(method)

    @app.get("/api/image/{image_id}", summary="The photo itself (its original with --originals, when there)",
             response_class=FileResponse)
    def image(image_id: str, download: bool = False, original: bool = True):
        path = service.image_file(image_id, original=original)
        name = Path(service.photo(image_id)["path"]).name if download else None
        # Revalidated on every view (answered 304 when unchanged): an id may name another photo after an add.
        return FileResponse(path, filename=name, content_disposition_type="attachment" if download else "inline",
                            headers={"Cache-Control": "private, no-cache"})

    @app.get("/api/thumb/{image_id}", summary="A thumbnail (JPEG, 256 px), made once and cached on disk",
             response_class=FileResponse)
    def thumb(image_id: str):
        return FileResponse(service.thumbnail(image_id), media_type="image/jpeg",
                            headers={"Cache-Control": "private, no-cache"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(images_dir=None, *, features_file=None, host: str = "127.0.0.1", port: int = 8000, originals=None,
          open_browser: bool = False, max_upload_mb: float = 25, progress: bool = True, **extract_kwargs) -> None:
    """Extract (if given a folder, or nothing: the demo library), then serve the app until Ctrl-C."""
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
    app = create_app(library, originals=originals, max_upload_bytes=int(max_upload_mb * 2**20), allowed_hosts=hosts)
    _warm(app.state.service)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"similar_finder: {len(library)} photos from {library.root}\nopen {url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _warm(service: LibraryService) -> None:
    """Build the model and the default approach now, so the first click and upload are quick."""
    if service.library.config:
        model_for(service.library.meta)
    service.approach("cosine")

