// sdtune ui: the page. All state lives on the server (the workspace folder); this page only draws it and
// polls it, so a second tab, or this one reopened, shows the same photos and the same running jobs.
"use strict";
const $ = (id) => document.getElementById(id);
let state = { photos: [], jobs: [] };
let currentTrain = null; // the train job this tab follows (its job list; the newest when the tab opens)
let formFrom = null; // the train job whose settings the Train form shows

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "X-Sdtune": "1", "Content-Type": "application/json" },
    body: body instanceof Blob ? body : JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const text = await r.text();
  let value;
  try { value = JSON.parse(text); } catch { value = { error: `${r.status} ${r.statusText}: ${text.slice(0, 200)}` }; }
  if (!r.ok) { const e = new Error(value.error); e.fields = value.fields || {}; e.status = r.status; throw e; }
  return value;
}

// Text from files and the server goes into the page as text nodes, never as HTML: a caption or a log line
// is the user's data ("</textarea><img onerror=...>" is shown, not run).
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
// /files/ URL of a workspace path: each part encoded (names may hold spaces, #, %, any script)
function fileUrl(rel) { return "/files/" + rel.split("/").map(encodeURIComponent).join("/"); }

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
// The status line under the photo controls: every request's error ends up here as one line.
function setStatus(text, bad) { const s = $("prep-status"); s.textContent = text; s.classList.toggle("bad", !!bad); }
const isText = (name) => name.toLowerCase().endsWith(".txt");
const stemOf = (name) => name.replace(/\.[^./]*$/, "");
// A folder upload's file keeps its subfolder (dog/00.jpg: the server stores dog_00.jpg); the folder picked
// itself, the first part of webkitRelativePath, is left out.
function uploadName(f) { return (f.webkitRelativePath || "").split("/").slice(1).join("/") || f.name; }

async function uploadOne(f, name, renamed) {
  const limit = state.max_upload_bytes;
  if (limit && f.size > limit) throw new Error(`${name}: ${f.size} bytes is over the ${limit / 2 ** 20} MiB limit`);
  // a caption goes to the name its photo was stored under in this batch (dog (2).jpg -> dog (2).txt)
  const sent = isText(name) && renamed[stemOf(name)] ? renamed[stemOf(name)] + ".txt" : name;
  let r;
  try { r = await api("/api/upload?name=" + encodeURIComponent(sent), f); } catch (e) {
    throw e.status ? e : new Error(`${name}: ${e.message}`); // no answer (connection closed): name the file
  }
  if (r.photo) renamed[stemOf(name)] = stemOf(r.photo);
  return r.note;
}

async function upload(files) {
  const list = Array.from(files).map((f) => ({ f, name: uploadName(f) }))
    .sort((a, b) => isText(a.name) - isText(b.name)); // photos first, so a caption finds its photo's name
  setStatus(`uploading ${list.length} files...`);
  const notes = [], errors = [], renamed = {};
  for (const { f, name } of list) {
    try { const note = await uploadOne(f, name, renamed); if (note) notes.push(note); } catch (e) { errors.push(e.message); }
  }
  const analysed = await analyse();
  const parts = [`${list.length - errors.length} of ${list.length} files added`, ...notes];
  if (errors.length) parts.push("refused: " + errors.join("; "));
  if (analysed !== true) parts.push(analysed);
  setStatus(parts.join("; "), errors.length || analysed !== true);
}
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });
$("files").addEventListener("change", (e) => upload(e.target.files));
$("folder").addEventListener("change", (e) => upload(e.target.files));

// Starting boxes and flags for every photo (boxes moved by hand are kept); true, or the error as one line.
async function analyse() {
  try {
    // the resolution as typed: the server names what is wrong with it ("1e999" would be JSON's null)
    await api("/api/analyse", { crop: $("crop").value, resolution: $("resolution").value.trim() });
    await refresh(true);
    return true;
  } catch (e) {
    try { await refresh(true); } catch { /* the analyse error is the one to show */ }
    return "analyse: " + e.message;
  }
}
async function analyseAgain() {
  setStatus("analysing...");
  const r = await analyse();
  if (r === true) setStatus(`analysed ${state.photos.length} photos (boxes you moved are kept)`); else setStatus(r, true);
}
$("analyse").addEventListener("click", analyseAgain);
$("crop").addEventListener("change", analyseAgain);

function photoCard(p) {
  const title = (p.warnings || []).join("; ");
  const flags = (p.flags || []).map((f) => el("span", { className: "flag", title }, f));
  const img = el("img", { src: fileUrl(p.preview) + "?v=" + Date.now() });
  const caption = el("textarea", { className: "caption", placeholder: `caption, e.g. a photo of ${shownSubject}`,
                                    value: p.caption || "" });
  const dropButton = el("button", { className: "drop-photo", textContent: "drop" });
  const card = el("div", { className: "card" },
    el("div", { className: "frame" }, img, el("div", { className: "box" }, el("div", { className: "handle" }))),
    el("div", { className: "name" }, p.name + " ", ...flags,
      p.moved ? el("span", { className: "moved", title: "kept when you Analyse again or change the starting crop" }, "your box") : null,
      p.skipped ? el("span", { className: "error" }, " " + p.skipped) : null,
      !p.skipped && title ? el("div", { className: "error" }, title) : null),
    caption, dropButton);
  card.dataset.name = p.name;
  img.addEventListener("load", () => placeBox(card, p));
  caption.addEventListener("change", (e) => api("/api/caption", { name: p.name, caption: e.target.value })
    .catch((err) => setStatus(`caption of ${p.name}: ${err.message}`, true)));
  dropButton.addEventListener("click", async () => {
    try { await api("/api/drop", { name: p.name }); await refresh(true); setStatus(`${p.name} dropped (kept in photos_dropped/)`); }
    catch (e) { setStatus(`drop ${p.name}: ${e.message}`, true); }
  });
  enableDrag(card, p);
  return card;
}

function drawPhotos() {
  $("photos").replaceChildren(...state.photos.map(photoCard));
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
      try { await api("/api/box", { name: p.name, box: p.box }); card.dataset.moved = "1"; p.moved = true; }
      catch (e) { setStatus(`crop box of ${p.name}: ${e.message}`, true); }
    };
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", up);
  });
}

// The prepared dataset: after Prepare, and on load when WORKSPACE/dataset holds one (state.dataset)
function showDataset(s, earlier) {
  setStatus((earlier ? "dataset prepared earlier: " : "prepared: ") +
    `${s.images} images (${s.dropped} dropped, ${s.skipped} skipped, ${s.warnings} warnings)` +
    (earlier ? "; Prepare again after changing photos" : ""));
  $("sheet").replaceChildren(el("h3", {}, "contact sheet"), el("img", { src: fileUrl("dataset/contact_sheet.jpg") + "?v=" + Date.now() }));
}

$("prepare").addEventListener("click", async () => {
  setStatus("preparing...");
  try {
    // captions typed but not yet sent (change fires on blur)
    for (const card of document.querySelectorAll(".card")) {
      await api("/api/caption", { name: card.dataset.name, caption: card.querySelector("textarea").value });
    }
    const drops = Array.from(document.querySelectorAll(".dropcheck:checked")).map((c) => c.value);
    const r = await api("/api/prepare", { resolution: $("resolution").value.trim(), crop: $("crop").value, drop: drops });
    showDataset(r.summary, false);
  } catch (e) { setStatus("prepare: " + e.message, true); }
});

// -- identifier --
let tokenTimer = null;
$("identifier").addEventListener("input", () => { clearTimeout(tokenTimer); tokenTimer = setTimeout(checkToken, 250); });
async function checkToken() {
  const word = $("identifier").value.trim();
  subjectChanged();
  if (!word) { for (const id of ["token-verdict", "token-reasons", "token-suggestions"]) $(id).textContent = ""; return; }
  try {
    const r = await api("/api/token?word=" + encodeURIComponent(word));
    $("token-verdict").replaceChildren(el("b", { className: "verdict-" + r.verdict }, r.verdict), ": " + r.reasons[0]);
    $("token-reasons").textContent = "tokens: " + r.pieces.join(" ");
    $("token-suggestions").replaceChildren(r.suggestions.length ? "try: " : "");
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
    identifier: $("identifier").value.trim(), class: $("class").value.trim() };
  showErrors(section, null);
  $("job-state").textContent = "checking the model, photos and settings...";
  try { currentTrain = formFrom = (await api("/api/train", form)).name; } catch (e) { showErrors(section, e); $("job-state").textContent = ""; }
});
// Stop and Resume act on the job this tab shows (its job list), never on another tab's newer one
$("stop").addEventListener("click", async () => {
  if (!currentTrain) return;
  try { await api("/api/stop", { name: currentTrain }); } catch (e) { showErrors($("tab-train"), e); }
});
$("resume").addEventListener("click", async () => {
  if (!currentTrain) return;
  try { currentTrain = formFrom = (await api("/api/resume", { name: currentTrain })).name; } catch (e) { showErrors($("tab-train"), e); }
});
$("train-jobs").addEventListener("change", (e) => { currentTrain = e.target.value; });

const TRAIN_FIELDS = ["base", "model_base", "recipe", "run", "steps", "learning_rate", "rank", "sample_every",
  "checkpoint_every", "log_every", "advanced", "identifier", "class"];
// the Train form as the followed job ran it (a reload, or another tab's run picked in the job list)
function fillForm(name, form) {
  if (formFrom === name || !form) return;
  formFrom = name;
  for (const id of TRAIN_FIELDS) if (form[id] !== undefined) $(id).value = form[id];
  if (form.prior !== undefined) $("prior").checked = form.prior === "true";
  checkToken();
}

// the subject as the page names it: placeholders and the Compare tab's first prompt follow it
let shownSubject = "sks toy";
function subjectChanged() {
  const subject = `${$("identifier").value.trim() || "sks"} ${$("class").value.trim() || "toy"}`;
  const prompts = $("prompts");
  if (prompts.value === `a photo of ${shownSubject} on a green background`) prompts.value = `a photo of ${subject} on a green background`;
  $("repo").placeholder = `you/${subject.replace(/ /g, "-")}-lora`;
  for (const caption of document.querySelectorAll("textarea.caption")) caption.placeholder = `caption, e.g. a photo of ${subject}`;
  shownSubject = subject;
}
$("class").addEventListener("input", subjectChanged);

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

function fmtEta(s) {
  if (s == null) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}

async function followTrain() {
  if (!currentTrain) return;
  const j = await api("/api/job?name=" + currentTrain);
  fillForm(j.name, j.form);
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
    $("samples").replaceChildren(...p.samples.slice().reverse().map((s) => {
      const img = el("img", { src: fileUrl(s) });
      img.dataset.path = s;
      return el("figure", {}, img, el("figcaption", {}, s.split("/").pop()));
    }));
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
// text from files and logs goes into the page as text (DOM nodes), never as HTML
function showImage(id, src) {
  const img = document.createElement("img");
  img.src = fileUrl(src) + "?v=" + Date.now();
  $(id).replaceChildren(img);
}
function showLog(id, lines) {
  const pre = document.createElement("pre");
  pre.textContent = lines.join("\n");
  $(id).replaceChildren(pre);
}
function showGrid(j) { if (j.state === "finished" && j.grid) showImage("grid", j.grid); else showLog("grid", j.log); }
// report.md as text, its images (![...](metrics.png)) as images from the report's folder
function showReport(run, r) {
  const root = $("report");
  root.replaceChildren();
  for (const line of (r.report || "no report").split("\n")) {
    const m = line.match(/^!\[([^\]]*)\]\(([\w.-]+)\)$/);
    if (m) {
      const img = document.createElement("img");
      img.src = fileUrl(`${r.folder}/${m[2]}`) + "?v=" + Date.now(); img.alt = m[1];
      root.appendChild(img);
    } else root.appendChild(document.createTextNode(line + "\n"));
  }
}
async function showEval(j) {
  const run = j.run_dir;
  if (j.state === "finished") showReport(run, await api("/api/report?run=" + encodeURIComponent(run)));
  else { $("report").textContent = j.log.join("\n"); }
}
function showExport(j) {
  const a = $("download");
  if (j.state !== "finished" || !j.file) { a.textContent = ""; a.removeAttribute("href"); $("export-state").textContent += ": " + j.log.slice(-2).join(" "); return; }
  const name = j.file.split("/").pop() + (j.file.endsWith(".safetensors") ? "" : ".zip"); // a PEFT folder comes as a .zip
  a.href = fileUrl(j.file) + "?download=1";
  a.textContent = "download " + name;
  a.setAttribute("download", name);
}
async function startJob(button, section, path, body, id, done) {
  showErrors(section, null);
  button.disabled = true; // a double click starts one job (the server refuses a twin of a running one too)
  try { follow(id, await api(path, body), done); } catch (e) { showErrors(section, e); } finally { button.disabled = false; }
}
$("compare").addEventListener("click", () => startJob($("compare"), $("tab-compare"), "/api/compare",
  { run: $("compare-run").value, prompts: $("prompts").value, seeds: $("seeds").value, scales: $("scales").value,
    all_checkpoints: $("all-checkpoints").checked }, "compare-state", showGrid));
$("evaluate").addEventListener("click", () => startJob($("evaluate"), $("tab-compare"), "/api/eval",
  { run: $("compare-run").value }, "compare-state", showEval));
$("export").addEventListener("click", () => {
  $("download").textContent = "";
  startJob($("export"), $("tab-export"), "/api/export", { run: $("export-run").value, format: $("format").value,
    checkpoint: $("checkpoint").value }, "export-state", showExport);
});
// Export's checkpoint list: the run's complete checkpoints, the final weights when it has them
async function listCheckpoints() {
  const run = $("export-run").value, sel = $("checkpoint");
  // new checkpoints appear while a run trains: asked again every 10 s, at once for another run
  if (!run || (sel.dataset.run === run && Date.now() - (+sel.dataset.at || 0) < 10000)) return;
  Object.assign(sel.dataset, { run, at: Date.now() });
  const chosen = sel.value, picked = sel.dataset.picked === run; // the user's own pick stands
  const p = await api("/api/progress?run=" + encodeURIComponent(run));
  const best = p.recommended && p.recommended.checkpoint;
  const options = [["", "final weights (else the latest checkpoint)"],
    ...p.checkpoints.slice().reverse().map((c) => [c, c === best ? c + " (recommended by eval)" : c])];
  sel.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
  // without a pick of the user's: eval's recommended checkpoint when the run has a report, else the final weights
  if (picked && (chosen === "" || p.checkpoints.includes(chosen))) sel.value = chosen;
  else if (best) sel.value = best;
  $("recommended").textContent = best ? `${best}: ${p.recommended.why}` : "";
}
$("export-run").addEventListener("change", () => { delete $("checkpoint").dataset.picked; listCheckpoints(); });
$("checkpoint").addEventListener("change", () => { $("checkpoint").dataset.picked = $("export-run").value; });
// after a reload: the newest finished grid, report and export are shown again
async function showLastOutputs() {
  const last = (kind) => state.jobs.filter((j) => j.kind === kind && j.state === "finished").pop();
  for (const [kind, show] of [["compare", showGrid], ["eval", showEval], ["export", showExport]]) {
    const j = last(kind);
    if (j) show(await api("/api/job?name=" + j.name));
  }
}
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
    recipe.replaceChildren(...state.recipes.map((r) => new Option(r, r, r === state.default_recipe, r === state.default_recipe)));
  }
  for (const sel of document.querySelectorAll("select.runs")) {
    const value = sel.value;
    sel.replaceChildren(...state.runs.map((r) => new Option(r, "runs/" + r)));
    if (value) sel.value = value;
  }
  const trains = state.jobs.filter((j) => j.kind === "train");
  if (!currentTrain && trains.length) currentTrain = trains[trains.length - 1].name; // a new tab: the newest run
  const list = $("train-jobs"), names = trains.map((j) => `${j.name} ${j.run_dir || ""} ${j.state}`).reverse();
  if (Array.from(list.options).map((o) => o.textContent).join() !== names.join()) {
    list.replaceChildren(...trains.slice().reverse().map((j) => new Option(`${j.name} ${j.run_dir || ""} ${j.state}`, j.name)));
  }
  if (currentTrain) list.value = currentTrain;
  listCheckpoints().catch(() => {});
}

async function tick() {
  try { await refresh(false); await followTrain(); await pollFollowed(); } catch (e) { console.log(e); }
  setTimeout(tick, 1000);
}
refresh(true).then(() => {
  $("resolution").value = state.resolution; $("crop").value = state.crop;
  if (state.dataset) showDataset(state.dataset, true);
  checkToken(); showLastOutputs().catch(console.log); tick();
}).catch((e) => { setStatus("could not load the workspace: " + e.message, true); tick(); });
