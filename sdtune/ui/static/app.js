// sdtune ui: the page. All state lives on the server (the workspace folder); this page only draws it and
// polls it, so a second tab, or this one reopened, shows the same photos and the same running jobs.
"use strict";
const $ = (id) => document.getElementById(id);
let state = { photos: [], jobs: [] };
let currentTrain = null; // the train job this page follows: the newest one

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "X-Sdtune": "1", "Content-Type": "application/json" },
    body: body instanceof Blob ? body : JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const value = await r.json();
  if (!r.ok) { const e = new Error(value.error); e.fields = value.fields || {}; throw e; }
  return value;
}

function showErrors(section, e) {
  section.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  if (!e) return;
  const fields = Object.keys(e.fields || {}).length ? e.fields : { general: e.message };
  for (const [field, text] of Object.entries(fields)) {
    const el = section.querySelector(`.error[data-field="${field}"]`) || section.querySelector('.error[data-field="general"]');
    if (el) el.textContent = text; else alert(text);
  }
}

// -- tabs --
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((x) => x.classList.toggle("active", x === b));
  document.querySelectorAll("section").forEach((s) => s.classList.toggle("active", s.id === "tab-" + b.dataset.tab));
}));

// -- photos --
async function upload(files) {
  const list = Array.from(files).sort((a, b) => (a.name.endsWith(".txt") ? 1 : 0) - (b.name.endsWith(".txt") ? 1 : 0));
  $("prep-status").textContent = `uploading ${list.length} files...`;
  const errors = [];
  for (const f of list) {
    try { await api("/api/upload?name=" + encodeURIComponent(f.name), f); } catch (e) { errors.push(e.message); }
  }
  await analyse();
  $("prep-status").textContent = errors.length ? "refused: " + errors.join("; ") : `${list.length} files added`;
}
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });
$("files").addEventListener("change", (e) => upload(e.target.files));
$("folder").addEventListener("change", (e) => upload(e.target.files));

async function analyse() {
  await api("/api/analyse", { crop: $("crop").value, resolution: +$("resolution").value });
  await refresh(true);
}
$("analyse").addEventListener("click", analyse);
$("crop").addEventListener("change", analyse);

function drawPhotos() {
  const root = $("photos");
  root.innerHTML = "";
  for (const p of state.photos) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.name = p.name;
    const flags = (p.flags || []).map((f) => `<span class="flag" title="${(p.warnings || []).join("; ")}">${f}</span>`).join("");
    card.innerHTML = `<div class="frame"><img src="/files/${p.preview}?v=${Date.now()}"><div class="box"><div class="handle"></div></div></div>
      <div>${p.name} ${flags} ${p.skipped ? '<span class="error">' + p.skipped + "</span>" : ""}</div>
      <textarea placeholder="caption, e.g. a photo of sks toy">${p.caption || ""}</textarea>
      <button class="drop-photo">drop</button>`;
    root.appendChild(card);
    const img = card.querySelector("img");
    img.addEventListener("load", () => placeBox(card, p));
    card.querySelector("textarea").addEventListener("change", (e) => api("/api/caption", { name: p.name, caption: e.target.value }));
    card.querySelector(".drop-photo").addEventListener("click", async () => { await api("/api/drop", { name: p.name }); await refresh(true); });
    enableDrag(card, p);
  }
}

function scaleOf(card, p) { return p.size ? card.querySelector("img").clientWidth / p.size[0] : 1; }

function placeBox(card, p) {
  const box = card.querySelector(".box");
  if (!p.box) { box.style.display = "none"; return; }
  const s = scaleOf(card, p);
  Object.assign(box.style, { left: p.box[0] * s + "px", top: p.box[1] * s + "px",
    width: (p.box[2] - p.box[0]) * s + "px", height: (p.box[3] - p.box[1]) * s + "px" });
}

// Drag the box to move it, its corner handle to resize it (square unless the crop is bucket); the box is kept
// inside the photo and sent to the server (source pixels) when the mouse is released.
function enableDrag(card, p) {
  const box = card.querySelector(".box");
  box.addEventListener("mousedown", (down) => {
    if (!p.box) return;
    down.preventDefault();
    const resize = down.target.classList.contains("handle");
    const s = scaleOf(card, p), start = p.box.slice(), [W, H] = p.size;
    const square = $("crop").value !== "bucket";
    const move = (e) => {
      const dx = (e.clientX - down.clientX) / s, dy = (e.clientY - down.clientY) / s;
      let [l, t, r, b] = start;
      if (resize) {
        let w = Math.max(8, r - l + dx), h = Math.max(8, b - t + dy);
        if (square) { w = h = Math.min(Math.max(w, h), W - l, H - t); }
        r = Math.min(W, l + w); b = Math.min(H, t + h);
      } else {
        const w = r - l, h = b - t;
        l = Math.min(Math.max(0, l + dx), W - w); t = Math.min(Math.max(0, t + dy), H - h);
        r = l + w; b = t + h;
      }
      p.box = [l, t, r, b].map(Math.round);
      placeBox(card, p);
    };
    const up = async () => {
      window.removeEventListener("mousemove", move);
      window.removeEventListener("mouseup", up);
      try { await api("/api/box", { name: p.name, box: p.box }); card.dataset.moved = "1"; }
      catch (e) { $("prep-status").textContent = e.message; }
    };
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", up);
  });
}

$("prepare").addEventListener("click", async () => {
  $("prep-status").textContent = "preparing...";
  // captions typed but not yet sent (change fires on blur)
  for (const card of document.querySelectorAll(".card")) {
    await api("/api/caption", { name: card.dataset.name, caption: card.querySelector("textarea").value });
  }
  try {
    const drops = Array.from(document.querySelectorAll(".dropcheck:checked")).map((c) => c.value);
    const r = await api("/api/prepare", { resolution: +$("resolution").value, crop: $("crop").value, drop: drops });
    const s = r.summary;
    $("prep-status").textContent = `prepared: ${s.images} images (${s.dropped} dropped, ${s.skipped} skipped, ${s.warnings} warnings)`;
    $("sheet").innerHTML = `<h3>contact sheet</h3><img src="/files/${r.contact_sheet}?v=${Date.now()}">`;
  } catch (e) { $("prep-status").textContent = "error: " + e.message; }
});

// -- identifier --
let tokenTimer = null;
$("identifier").addEventListener("input", () => { clearTimeout(tokenTimer); tokenTimer = setTimeout(checkToken, 250); });
async function checkToken() {
  const word = $("identifier").value.trim();
  if (!word) return;
  try {
    const r = await api("/api/token?word=" + encodeURIComponent(word));
    $("token-verdict").innerHTML = `<b class="verdict-${r.verdict}">${r.verdict}</b>: ${r.reasons[0]}`;
    $("token-reasons").textContent = "tokens: " + r.pieces.join(" ");
    $("token-suggestions").innerHTML = r.suggestions.length ? "try: " : "";
    for (const s of r.suggestions) {
      const b = document.createElement("button");
      b.textContent = s;
      b.addEventListener("click", () => { $("identifier").value = s; checkToken(); });
      $("token-suggestions").appendChild(b);
    }
  } catch (e) { $("token-verdict").textContent = e.message; }
}

// -- train --
$("train").addEventListener("click", async () => {
  const section = $("tab-train");
  const form = { base: $("base").value, model_base: $("model_base").value.trim(), recipe: $("recipe").value, run: $("run").value, steps: $("steps").value,
    learning_rate: $("learning_rate").value, rank: $("rank").value, sample_every: $("sample_every").value,
    checkpoint_every: $("checkpoint_every").value, log_every: $("log_every").value, prior: $("prior").checked, advanced: $("advanced").value,
    identifier: $("identifier").value.trim() };
  showErrors(section, null);
  $("job-state").textContent = "starting...";
  try { currentTrain = (await api("/api/train", form)).name; } catch (e) { showErrors(section, e); $("job-state").textContent = ""; }
});
$("stop").addEventListener("click", async () => { if (currentTrain) await api("/api/stop", { name: currentTrain }); });
$("resume").addEventListener("click", async () => {
  if (!currentTrain) return;
  try { currentTrain = (await api("/api/resume", { name: currentTrain })).name; } catch (e) { showErrors($("tab-train"), e); }
});

function drawLoss(losses) {
  const svg = $("loss"), W = 420, H = 160, pad = 30;
  if (!losses.length) { svg.innerHTML = ""; return; }
  const xs = losses.map((l) => l.step), ys = losses.map((l) => l.loss).filter(Number.isFinite);
  const x0 = 0, x1 = Math.max(...xs, 1), y0 = Math.min(...ys), y1 = Math.max(...ys) + 1e-9;
  const px = (x) => pad + (W - 2 * pad) * (x - x0) / (x1 - x0), py = (y) => H - pad - (H - 2 * pad) * (y - y0) / (y1 - y0);
  const pts = losses.filter((l) => Number.isFinite(l.loss)).map((l) => `${px(l.step).toFixed(1)},${py(l.loss).toFixed(1)}`).join(" ");
  svg.innerHTML = `<text x="${pad}" y="14" font-size="11">loss (${y0.toFixed(3)} - ${y1.toFixed(3)})</text>
    <text x="${W - pad}" y="${H - 8}" font-size="11" text-anchor="end">step ${x1}</text>
    <polyline id="loss-line" fill="none" stroke="#c60" stroke-width="2" points="${pts}"/>` +
    losses.map((l) => `<circle cx="${px(l.step)}" cy="${py(l.loss)}" r="2.5" fill="#c60"/>`).join("");
}

function fmtEta(s) { return s == null ? "" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`; }

async function followTrain() {
  if (!currentTrain) return;
  const j = await api("/api/job?name=" + currentTrain);
  $("job-state").textContent = `${j.name}: ${j.state}`;
  $("job-state").dataset.state = j.state;
  $("log").textContent = j.log.join("\n");
  $("log").scrollTop = $("log").scrollHeight; // the newest lines
  const p = j.progress;
  if (!p) return;
  const frac = p.max_steps ? p.step / p.max_steps : 0;
  $("bar").style.width = (100 * frac).toFixed(1) + "%";
  $("progress-text").textContent = `step ${p.step} / ${p.max_steps || "?"}` + (j.state === "running" && p.eta_s != null ? `, ETA ${fmtEta(p.eta_s)}` : "");
  drawLoss(p.losses);
  const shown = Array.from($("samples").querySelectorAll("img")).map((i) => i.dataset.path).join();
  if (shown !== p.samples.join()) {
    $("samples").innerHTML = p.samples.slice().reverse().map((s) => `<figure><img data-path="${s}" src="/files/${s}"><figcaption>${s.split("/").pop()}</figcaption></figure>`).join("");
  }
}

// -- compare / eval / export / push: each a job whose end the page waits for --
const followed = {}; // element id -> {job, done(status)}
function follow(id, job, done) { followed[id] = { job, done }; $(id).textContent = `${job.name}: ${job.state}`; }
async function pollFollowed() {
  for (const [id, f] of Object.entries(followed)) {
    const j = await api("/api/job?name=" + f.job.name);
    $(id).textContent = `${j.name}: ${j.state}`;
    $(id).dataset.state = j.state;
    if (j.state !== "running" && j.state !== "starting") { delete followed[id]; f.done(j); }
  }
}
$("compare").addEventListener("click", async () => {
  showErrors($("tab-compare"), null);
  try {
    const job = await api("/api/compare", { run: $("compare-run").value, prompts: $("prompts").value,
      seeds: $("seeds").value, scales: $("scales").value, all_checkpoints: $("all-checkpoints").checked });
    follow("compare-state", job, (j) => {
      $("grid").innerHTML = j.state === "finished" ? `<img src="/files/${job.grid}?v=${Date.now()}">` : `<pre>${j.log.join("\n")}</pre>`;
    });
  } catch (e) { showErrors($("tab-compare"), e); }
});
$("evaluate").addEventListener("click", async () => {
  const run = $("compare-run").value;
  try {
    follow("compare-state", await api("/api/eval", { run }), async () => {
      $("report").textContent = (await api("/api/report?run=" + encodeURIComponent(run))).report || "no report";
    });
  } catch (e) { showErrors($("tab-compare"), e); }
});
$("export").addEventListener("click", async () => {
  $("download").textContent = "";
  try {
    const job = await api("/api/export", { run: $("export-run").value, format: $("format").value });
    follow("export-state", job, (j) => {
      if (j.state !== "finished") { $("export-state").textContent += ": " + j.log.slice(-2).join(" "); return; }
      const a = $("download");
      a.href = `/files/${job.file}?download=1`;
      a.textContent = "download " + job.file.split("/").pop();
      a.setAttribute("download", job.file.split("/").pop());
    });
  } catch (e) { $("export-state").textContent = e.message; }
});
$("push").addEventListener("click", async () => {
  showErrors($("tab-export"), null);
  try {
    const job = await api("/api/push", { run: $("export-run").value, repo: $("repo").value, token: $("token").value, dry_run: $("dry-run").checked });
    follow("push-state", job, (j) => { $("push-log").textContent = j.log.join("\n"); });
  } catch (e) { showErrors($("tab-export"), e); }
});

// -- the whole page from the server's state --
async function refresh(photosToo) {
  state = await api("/api/state");
  $("workspace").textContent = state.workspace;
  if (photosToo) drawPhotos();
  const recipe = $("recipe");
  if (!recipe.options.length) {
    recipe.innerHTML = state.recipes.map((r) => `<option${r === state.default_recipe ? " selected" : ""}>${r}</option>`).join("");
  }
  for (const sel of document.querySelectorAll("select.runs")) {
    const value = sel.value;
    sel.innerHTML = state.runs.map((r) => `<option value="runs/${r}">${r}</option>`).join("");
    if (value) sel.value = value;
  }
  const trains = state.jobs.filter((j) => j.kind === "train");
  if (trains.length) currentTrain = trains[trains.length - 1].name; // every tab follows the newest run
}

async function tick() {
  try { await refresh(false); await followTrain(); await pollFollowed(); } catch (e) { console.log(e); }
  setTimeout(tick, 1000);
}
refresh(true).then(() => { $("resolution").value = state.resolution; $("crop").value = state.crop; checkToken(); tick(); });
