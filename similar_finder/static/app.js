// similar_finder's page: plain JavaScript over the JSON API under /api/ (see /docs).
// Views are routed by the URL hash, so the browser's Back button and links work:
//   #/  library   ·   #/photo/ID  similar photos   ·   #/search  an uploaded photo   ·   #/map   ·   #/duplicates
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  info: null,
  approach: localStorage.getItem("approach") || "cosine",
  n: Number(localStorage.getItem("n") || 8),
  folder: "", sort: "path", descending: false,
  upload: null,        // the last uploaded File, searched again when the approach or n changes
  selected: 0,         // keyboard selection in the library grid
  picked: -1,          // keyboard selection among the similar photos
};

// --- talking to the API ----------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A value the server computes in the background (the map) is answered 202 "computing" with Retry-After until it
// is ready: ask again then, for at most `patience` ms.
async function apiWhenReady(path, patience = 10 * 60 * 1000) {
  const until = Date.now() + patience;
  for (;;) {
    const response = await fetch(path);
    if (response.status !== 202) return answerOf(response);
    if (Date.now() > until) throw new Error("the server is still computing this; try again later");
    const wait = Number(response.headers.get("Retry-After")) || 2;
    await sleep(Math.min(wait, 5) * 1000);
  }
}

async function api(path, options) {
  return answerOf(await fetch(path, options));
}

async function answerOf(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const detail = body && body.detail;
    const message = typeof detail === "string" ? detail
      : Array.isArray(detail) ? detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ")
      : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function fmtBytes(n) {
  if (n == null) return "";
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(0)} KB` : `${(n / (1 << 20)).toFixed(1)} MB`;
}

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

// --- views -----------------------------------------------------------------------------

function show(view) {
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `${view}-view`;
  for (const link of document.querySelectorAll("#views a")) {
    link.classList.toggle("active", link.dataset.view === view || (view === "similar" && link.dataset.view === "library"));
  }
  $("#browse-controls").hidden = view !== "library";
}

async function route() {
  if (state.routed === location.hash) { state.routed = null; return; }  // already shown by search()
  state.routed = null;
  const [, view, id] = location.hash.replace(/^#/, "").split("/");
  try {
    if (view === "photo" && id !== undefined) return await openSimilar(id);
    if (view === "search" && state.upload) return await openSearch(state.upload);
    if (view === "map") return await openMap();
    if (view === "duplicates") return await openDuplicates();
    show("library");
    grid.refresh();
  } catch (err) {
    showError(err.message);
  }
}

// --- library: a virtual grid, so 100k photos scroll smoothly ------------------------------
// Only the rows in view (and a few around them) exist in the page; pages of 200 photos are
// fetched as they come into view and kept.

const grid = {
  pageSize: 200, pages: new Map(), total: 0, key: "", loading: new Set(),
  scroller: null, inner: null, cell: 0, cols: 1,

  query(page) {
    const params = new URLSearchParams({ offset: page * this.pageSize, limit: this.pageSize, sort: state.sort,
                                         descending: state.descending });
    if (state.folder) params.set("folder", state.folder);
    return `/api/images?${params}`;
  },

  async refresh() {
    const key = `${state.folder}|${state.sort}|${state.descending}`;
    if (key !== this.key) {
      this.key = key; this.pages.clear(); this.loading.clear(); state.selected = 0;
      this.scroller.scrollTop = 0;
      await this.load(0);
    }
    this.layout();
  },

  async load(page) {
    if (this.pages.has(page) || this.loading.has(page)) return;
    this.loading.add(page);
    const key = this.key;
    try {
      const body = await api(this.query(page));
      if (key !== this.key) return;  // the filter changed meanwhile
      this.total = body.total;
      this.pages.set(page, body.images);
    } catch (err) {
      showError(err.message);
    } finally {
      this.loading.delete(page);
    }
    this.render();
  },

  layout() {
    const styles = getComputedStyle(document.documentElement);
    const gap = parseFloat(styles.getPropertyValue("--gap"));
    this.cell = parseFloat(styles.getPropertyValue("--cell")) + gap;
    this.cols = Math.max(1, Math.floor((this.scroller.clientWidth - gap) / this.cell));
    const rows = Math.ceil(this.total / this.cols);
    this.inner.style.height = `${rows * this.cell}px`;
    const count = this.total.toLocaleString();
    $("#library-count").textContent = `${count} photo${this.total === 1 ? "" : "s"}${state.folder ? ` in ${state.folder}/` : ""}`;
    $("#empty-library").hidden = this.total > 0;
    this.render();
  },

  photoAt(index) {
    const page = this.pages.get(Math.floor(index / this.pageSize));
    return page ? page[index % this.pageSize] : undefined;
  },

  render() {
    if (!this.cell) return;
    const top = this.scroller.scrollTop, height = this.scroller.clientHeight;
    const firstRow = Math.max(0, Math.floor(top / this.cell) - 2);
    const lastRow = Math.ceil((top + height) / this.cell) + 2;
    const first = firstRow * this.cols, last = Math.min(this.total, lastRow * this.cols);
    const tiles = [];
    for (let i = first; i < last; i++) {
      const photo = this.photoAt(i);
      if (!photo) { this.load(Math.floor(i / this.pageSize)); continue; }
      const tile = el("div", { className: "tile", tabIndex: -1, title: photo.path }, [
        el("img", { src: `/api/thumb/${photo.image_id}`, alt: photo.path, loading: "lazy", decoding: "async" }),
        el("div", { className: "name", textContent: photo.path.split("/").pop() }),
      ]);
      tile.dataset.index = i;
      tile.dataset.id = photo.image_id;
      tile.style.transform = `translate(${(i % this.cols) * this.cell}px, ${Math.floor(i / this.cols) * this.cell}px)`;
      if (i === state.selected) tile.classList.add("selected");
      tile.addEventListener("click", () => { state.selected = i; location.hash = `#/photo/${photo.image_id}`; });
      tiles.push(tile);
    }
    this.inner.replaceChildren(...tiles);
  },

  move(delta) {
    if (!this.total) return;
    state.selected = Math.min(this.total - 1, Math.max(0, state.selected + delta));
    const rowTop = Math.floor(state.selected / this.cols) * this.cell;
    if (rowTop < this.scroller.scrollTop) this.scroller.scrollTop = rowTop;
    else if (rowTop + this.cell > this.scroller.scrollTop + this.scroller.clientHeight) {
      this.scroller.scrollTop = rowTop + this.cell - this.scroller.clientHeight;
    }
    this.render();
  },

  open() {
    const photo = this.photoAt(state.selected);
    if (photo) location.hash = `#/photo/${photo.image_id}`;
  },
};

// --- similar photos --------------------------------------------------------------------

let latestQuery = 0;  // answers that arrive after a newer question are dropped

async function openSimilar(id) {
  const asked = ++latestQuery;
  const params = new URLSearchParams({ n: state.n, approach: state.approach });
  const [photo, body] = await Promise.all([api(`/api/photo/${id}`), api(`/api/similar/${id}?${params}`)]);
  if (asked !== latestQuery) return;
  $("#query-img").src = `/api/image/${photo.image_id}`;
  $("#query-img").alt = photo.path;
  const facts = [
    el("strong", { textContent: photo.path }),
    el("br"),
    document.createTextNode([photo.width && `${photo.width} × ${photo.height} px`, fmtBytes(photo.bytes),
                             photo.taken && `taken ${photo.taken.replace("T", " ")}`, photo.camera,
                             photo.cluster != null && `cluster ${photo.cluster}`].filter(Boolean).join(" · ")),
    el("div", { className: "actions" }, [
      el("a", { href: `/api/image/${photo.image_id}?download=true`, textContent: photo.original ? "Download original" : "Download" }),
    ]),
  ];
  $("#query-facts").replaceChildren(...facts);
  showResults(body, `Similar to ${photo.path.split("/").pop()}`);
}

async function openSearch(file) {
  const form = new FormData();
  form.append("file", file);
  form.append("n", state.n);
  form.append("approach", state.approach);
  const asked = ++latestQuery;
  const body = await api("/api/search", { method: "POST", body: form });
  if (asked !== latestQuery) return;
  $("#query-img").src = URL.createObjectURL(file);
  $("#query-img").alt = file.name;
  const add = el("button", { type: "button", textContent: "Add to library" });
  add.addEventListener("click", () => addToLibrary(file, add));
  $("#query-facts").replaceChildren(
    el("strong", { textContent: file.name }), el("br"),
    document.createTextNode(`${fmtBytes(file.size)} · not in the library (nothing was stored)`),
    el("div", { className: "actions" }, [add]),
  );
  showResults(body, `Similar to your photo ${file.name}`);
}

async function addToLibrary(file, button) {
  button.disabled = true;
  button.textContent = "Adding…";
  try {
    const form = new FormData();
    form.append("file", file);
    const photo = await api("/api/library", { method: "POST", body: form });
    state.upload = null;
    grid.key = "";  // the library changed: browse it afresh, map it afresh
    map.method = null;
    await loadInfo();
    location.hash = `#/photo/${photo.image_id}`;
  } catch (err) {
    button.disabled = false;
    button.textContent = "Add to library";
    showError(err.message);
  }
}

function showResults(body, title) {
  show("similar");
  $("#error").hidden = true;
  $("#similar-title").textContent = `${title} — ${state.info.approaches[body.approach]}`;
  $("#no-results").hidden = body.results.length > 0;
  const shown = body.results.length;
  $("#similar-count").textContent = shown && shown < state.n
    ? `${shown} of ${state.n}: no other photo is close enough` : "";
  $("#no-results-reason").textContent = body.reason ? `${body.reason[0].toUpperCase()}${body.reason.slice(1)}.` : "";
  $("#answer-note").textContent = body.note || "";  // photos gone or damaged since the extraction, left out
  $("#answer-note").hidden = !body.note;
  state.picked = -1;
  const items = body.results.map((r, i) => {
    const item = el("li", { tabIndex: 0, title: r.path }, [
      el("img", { src: `/api/thumb/${r.image_id}`, alt: r.path, loading: "lazy" }),
      el("div", { className: "meta" }, [
        el("div", {}, [el("span", { className: "rank", textContent: `${i + 1}.` }),
                       // a near-duplicate says how it differs from the query; the others how far they are
                       r.relation != null ? el("span", { className: "relation", textContent: r.relation })
                         : el("span", { className: "distance", textContent: r.distance.toFixed(3) }),
                       el("span", { className: "muted", textContent: r.relation != null ? "" : " distance" })]),
        el("div", { className: "path", textContent: r.cluster != null ? `${r.path} · cluster ${r.cluster}` : r.path }),
      ]),
    ]);
    item.dataset.id = r.image_id;
    item.addEventListener("click", () => { location.hash = `#/photo/${r.image_id}`; });
    return item;
  });
  $("#results").replaceChildren(...items);
}

// --- map -------------------------------------------------------------------------------

const map = { points: [], images: new Map(), hover: null, method: null };

async function openMap() {
  show("map");
  const method = $("#map-method").value;
  if (map.method !== method) {
    map.points = []; map.images.clear(); map.method = method;
    drawMap();
    $("#map-note").textContent = "Computing the map in the background (once; it is cached)…";
    let body;
    try {
      body = await apiWhenReady(`/api/map?method=${method}`);
    } catch (err) {
      if (map.method === method) map.method = null;  // opening the map again tries again
      throw err;
    }
    if (map.method !== method) return;  // switched meanwhile: the other answer is drawn
    map.points = body.points;
    $("#map-note").textContent = body.sampled
      ? `${body.method} of an even sample of ${body.shown.toLocaleString()} of ${body.total.toLocaleString()} photos (more would take t-SNE over a minute)`
      : `${body.method} of all ${body.total.toLocaleString()} photos · hover to see a photo, click to open it`;
    // Thumbnails on the map for up to 400 photos; the others are dots.
    const step = Math.max(1, Math.ceil(map.points.length / 400));
    map.points.forEach((p, i) => {
      if (i % step) return;
      const img = new Image();
      img.onload = () => drawMap();
      img.src = `/api/thumb/${p.image_id}`;
      map.images.set(p.image_id, img);
    });
  }
  drawMap();
}

function mapGeometry() {
  const canvas = $("#map");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight, pad = 40;
  return { canvas, ratio, w, h, x: (p) => pad + p.x * (w - 2 * pad), y: (p) => pad + (1 - p.y) * (h - 2 * pad) };
}

function folderColour(path) {
  const folder = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : "";
  let hash = 0;
  for (const c of folder) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 60% 45%)`;
}

function drawMap() {
  const g = mapGeometry();
  if (!g.w) return;
  g.canvas.width = g.w * g.ratio;
  g.canvas.height = g.h * g.ratio;
  const ctx = g.canvas.getContext("2d");
  ctx.scale(g.ratio, g.ratio);
  const size = Math.max(18, Math.min(44, Math.sqrt((g.w * g.h) / Math.max(1, map.images.size)) * 0.6));
  for (const p of map.points) {
    const img = map.images.get(p.image_id);
    ctx.fillStyle = folderColour(p.path);
    if (img && img.complete && img.naturalWidth) {
      ctx.fillRect(g.x(p) - size / 2 - 2, g.y(p) - size / 2 - 2, size + 4, size + 4);
      ctx.drawImage(img, g.x(p) - size / 2, g.y(p) - size / 2, size, size);
    } else {
      ctx.beginPath(); ctx.arc(g.x(p), g.y(p), 3.5, 0, 2 * Math.PI); ctx.fill();
    }
  }
  if (map.hover) {
    ctx.strokeStyle = "#2b6cb0"; ctx.lineWidth = 3;
    ctx.strokeRect(g.x(map.hover) - size / 2 - 3, g.y(map.hover) - size / 2 - 3, size + 6, size + 6);
  }
}

function nearestOnMap(event) {
  const g = mapGeometry();
  const rect = g.canvas.getBoundingClientRect();
  const mx = event.clientX - rect.left, my = event.clientY - rect.top;
  let best = null, bestD = 30 * 30;
  for (const p of map.points) {
    const d = (g.x(p) - mx) ** 2 + (g.y(p) - my) ** 2;
    if (d < bestD) { best = p; bestD = d; }
  }
  return { best, mx, my };
}

// --- duplicates ------------------------------------------------------------------------

async function openDuplicates() {
  show("duplicates");
  const body = await api("/api/duplicates");
  const photos = body.groups.reduce((sum, g) => sum + g.length, 0);
  $("#dup-note").textContent = body.groups.length
    ? `${body.groups.length} groups, ${photos} photos, largest first; the one to keep first, and how each other differs`
    : body.message;
  if (body.note) $("#dup-note").textContent += ` · ${body.note}`;
  $("#groups").replaceChildren(...body.groups.map((group, i) => el("div", { className: "group" }, [
    el("h3", { textContent: `Group ${i + 1} · ${group.length} photos` }),
    el("ol", {}, group.map((p) => {
      const item = el("li", { title: p.path }, [el("img", { src: `/api/thumb/${p.image_id}`, alt: p.path, loading: "lazy" }),
                                                el("span", { textContent: p.path }),
                                                el("span", { className: "muted", textContent: p.keep ? "keep" : p.relation || "" })]);
      item.addEventListener("click", () => { location.hash = `#/photo/${p.image_id}`; });
      return item;
    })),
  ])));
}

// --- controls --------------------------------------------------------------------------

async function loadInfo() {
  state.info = await api("/api/info");
  const info = state.info;
  $("#summary").textContent = `${info.images.toLocaleString()} photos · ${info.backbone || "unknown backbone"}, ` +
    `${info.dim}-d${info.skipped ? ` · ${info.skipped} files skipped` : ""}`;
  const folder = $("#folder");
  folder.replaceChildren(el("option", { value: "", textContent: "All folders" }),
    ...info.folders.map((f) => el("option", { value: f.folder, textContent: `${f.folder || "(top)"} — ${f.photos}` })));
  folder.value = state.folder;
  $("#approaches").replaceChildren(...Object.entries(info.approaches).map(([name, label]) => {
    const input = el("input", { type: "radio", name: "approach", value: name, checked: name === state.approach });
    input.addEventListener("change", () => { state.approach = name; localStorage.setItem("approach", name); rerunQuery(); });
    return el("label", {}, [input, document.createTextNode(label)]);
  }));
}

function rerunQuery() {
  if (!$("#similar-view").hidden) route();
}

async function search(file) {
  if (!file) return;
  try {
    await openSearch(file);
    state.upload = file;  // only a photo that could be searched is searched again
    if (location.hash !== "#/search") { state.routed = "#/search"; location.hash = "#/search"; }
  } catch (err) {
    showError(err.message);
  }
}

function setUp() {
  grid.scroller = $("#grid-scroll");
  grid.inner = $("#grid");
  grid.scroller.addEventListener("scroll", () => requestAnimationFrame(() => grid.render()), { passive: true });
  window.addEventListener("resize", () => { grid.layout(); if (!$("#map-view").hidden) drawMap(); });
  window.addEventListener("hashchange", route);

  $("#n").value = state.n;
  $("#n-value").textContent = state.n;
  $("#n").addEventListener("input", (e) => { $("#n-value").textContent = e.target.value; });
  $("#n").addEventListener("change", (e) => { state.n = Number(e.target.value); localStorage.setItem("n", state.n); rerunQuery(); });
  $("#folder").addEventListener("change", (e) => { state.folder = e.target.value; grid.refresh(); });
  $("#sort").addEventListener("change", (e) => { state.sort = e.target.value; grid.refresh(); });
  $("#descending").addEventListener("change", (e) => { state.descending = e.target.checked; grid.refresh(); });
  $("#back").addEventListener("click", () => history.length > 1 ? history.back() : (location.hash = "#/"));

  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => { search(e.target.files[0]); e.target.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file").click(); } });
  for (const target of [drop, document.body]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    target.addEventListener("dragleave", () => drop.classList.remove("over"));
    target.addEventListener("drop", (e) => { e.preventDefault(); e.stopPropagation(); drop.classList.remove("over");
                                             search(e.dataTransfer.files[0]); });
  }

  $("#map-method").addEventListener("change", () => openMap().catch((err) => showError(err.message)));
  const canvas = $("#map");
  canvas.addEventListener("mousemove", (event) => {
    const { best, mx, my } = nearestOnMap(event);
    const tip = $("#map-tip");
    if (best !== map.hover) { map.hover = best; drawMap(); }
    tip.hidden = !best;
    if (best) {
      tip.querySelector("img").src = `/api/thumb/${best.image_id}`;
      tip.querySelector("span").textContent = best.path;
      tip.style.left = `${Math.min(mx + 16, canvas.clientWidth - 200)}px`;
      tip.style.top = `${Math.min(my + 16, canvas.clientHeight - 210)}px`;
    }
  });
  canvas.addEventListener("mouseleave", () => { $("#map-tip").hidden = true; map.hover = null; drawMap(); });
  canvas.addEventListener("click", (event) => {
    const { best } = nearestOnMap(event);
    if (best) location.hash = `#/photo/${best.image_id}`;
  });

  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented) return;
    if (e.target.matches("input, select, textarea") && e.key !== "Escape") return;
    // Enter on a link, a button or the drop zone is theirs, not the grid's.
    if (e.key === "Enter" && e.target.closest("a, button, label, #controls")) return;
    if (e.key === "Escape") {
      if (!$("#error").hidden) { $("#error").hidden = true; return; }
      if (!$("#similar-view").hidden || !$("#map-view").hidden || !$("#duplicates-view").hidden) {
        e.preventDefault(); location.hash = "#/";
      }
      return;
    }
    if (!$("#library-view").hidden) {
      const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -grid.cols, ArrowDown: grid.cols };
      if (e.key in moves) { e.preventDefault(); grid.move(moves[e.key]); }
      else if (e.key === "Enter") { e.preventDefault(); grid.open(); }
    } else if (!$("#similar-view").hidden) {
      const items = [...document.querySelectorAll("#results li")];
      const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -1, ArrowDown: 1 };
      if (e.key in moves && items.length) {
        e.preventDefault();
        state.picked = Math.min(items.length - 1, Math.max(0, state.picked + moves[e.key]));
        items.forEach((item, i) => item.classList.toggle("selected", i === state.picked));
        items[state.picked].focus();
      } else if (e.key === "Enter" && items[state.picked]) {
        e.preventDefault(); location.hash = `#/photo/${items[state.picked].dataset.id}`;
      }
    }
  });
}

setUp();
loadInfo().then(route).catch((err) => showError(`The library could not be loaded: ${err.message}`));
