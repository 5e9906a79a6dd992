"""Peak memory and time of the app under concurrent worst-case uploads (issue 20: decoding bounded by work).

    python bench/upload_bench.py [--concurrent 4] [--max-upload-mp 50] [--frames 20000]

Builds a small library (generated photos, EfficientNet-Lite0 without weights at 64 px: the model is not what is
measured), starts ``similar-finder app`` on it in its own process on 127.0.0.1, and sends ``--concurrent``
uploads at once to ``/api/search`` of each worst case:

- ``png-9400``: a 9400x9400 PNG (88 MP, just under PIL's bomb cap; a few hundred kB), refused over the budget;
- ``png-budget``: an RGB PNG just under the pixel budget (the largest photo that is decoded);
- ``gif-frames``: a GIF of ``--frames`` frames (only its first is decoded).

It samples the server's resident memory (``/proc/PID/status``, every 10 ms) and prints, per case, the answers,
the wall time and the peak above the idle server (target: under 500 MB). ``--max-upload-mp 89`` lifts the budget
to PIL's cap, to see what the decoding slots alone bound.
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Sampler:
    """The process's peak resident memory while it runs, sampled every 10 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.01)

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def png(width: int, height: int, mode: str) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode != "1" else 1).save(out, "PNG")
    return out.getvalue()


def many_frames(frames: int) -> bytes:
    images = [Image.new("P", (16, 16), i % 250) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], optimize=False, duration=20)
    return out.getvalue()


def library(folder: Path) -> Path:
    from similar_finder import extract_features

    rng = np.random.default_rng(0)
    (folder / "photos").mkdir(parents=True)
    for i in range(8):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / "photos" / f"p{i}.jpg")
    extract_features(folder / "photos", folder / "f.csv", "efficientnet_lite0", weights=None, input_size=64,
                     progress=False)
    return folder / "f.csv"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--max-upload-mp", type=float, default=50)
    parser.add_argument("--frames", type=int, default=20_000)
    args = parser.parse_args(argv)
    import httpx

    side = int((args.max_upload_mp * 1e6) ** 0.5) - 8
    cases = {"png-9400": png(9400, 9400, "1"), "png-budget": png(side, side, "RGB"),
             "gif-frames": many_frames(args.frames)}
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        csv = library(Path(tmp))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "similar_finder", "app", "--features-file", str(csv),
                                   "--port", str(port), "--max-upload-mp", str(args.max_upload_mp)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    httpx.get(f"{url}/api/info", timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.3)
            small = io.BytesIO()
            Image.new("RGB", (64, 64), (200, 10, 10)).save(small, "JPEG")
            httpx.post(f"{url}/api/search", files={"file": ("warm.jpg", small.getvalue())}, timeout=60)
            time.sleep(1)
            idle = rss_mb(server.pid)
            print(f"server idle: {idle:.0f} MB resident; {args.concurrent} concurrent uploads of each case; "
                  f"budget {args.max_upload_mp:g} MP")
            print("| case | upload | answers | wall s | peak above idle MB |\n|---|---|---|---|---|")
            for name, data in cases.items():
                with Image.open(io.BytesIO(data)) as img:
                    shape = f"{img.size[0]}x{img.size[1]}, {getattr(img, 'n_frames', 1) if name.startswith('gif') else 1} frame(s)"

                def send(_):
                    return httpx.post(f"{url}/api/search", files={"file": (f"{name}.img", data)},
                                      timeout=300).status_code

                base = rss_mb(server.pid)
                with Sampler(server.pid) as sampler, ThreadPoolExecutor(args.concurrent) as pool:
                    start = time.perf_counter()
                    statuses = list(pool.map(send, range(args.concurrent)))
                    wall = time.perf_counter() - start
                print(f"| {name} | {shape}, {len(data) / 1e3:.0f} kB | {sorted(statuses)} | {wall:.2f} | "
                      f"{sampler.peak - idle:.0f} (from {base - idle:+.0f}) |", flush=True)
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
