// The sd_mlx web page: a form over the AUTOMATIC1111-compatible API of this server (same origin, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const api = (path) => "sdapi/v1/" + path;
let currentModel = null;
let polling = null;
let progressSeen = 0;
let previewsSeen = 0;

function setState(state) {
  document.body.dataset.state = state;
  $("generate").disabled = state !== "idle";
  $("interrupt").disabled = state !== "running";
}

function showMessage(text, kind) {
  const m = $("message");
  m.textContent = text || "";
  m.className = "message" + (kind ? " " + kind : "");
}

// An error answer as one line: our {"detail": "..."} or FastAPI's list of field errors.
function errorText(status, body) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((e) => (e.loc || []).slice(1).join(".") + ": " + e.msg).join("; ");
  }
  return "HTTP " + status;
}

async function call(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(api(path), options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error(errorText(response.status, data));
  return data;
}

function fillSelect(select, items, selected) {
  select.innerHTML = "";
  for (const item of items) {
    const option = document.createElement("option");
    option.value = item.value;
    option.textContent = item.label;
    if (item.value === selected) option.selected = true;
    select.appendChild(option);
  }
}

async function loadLists() {
  const [samplers, models, options] = await Promise.all([
    call("GET", "samplers"), call("GET", "sd-models"), call("GET", "options"),
  ]);
  currentModel = options.sd_model_checkpoint;
  fillSelect($("sampler"), samplers.map((s) => ({ value: s.name, label: s.name })), "Euler a");
  fillSelect($("model"), models.map((m) => ({ value: m.title, label: m.title })), currentModel);
  $("server-status").textContent = "ready";
  $("server-status").className = "status ok";
}

function b64ToBlob(b64) {
  const bytes = atob(b64);
  const array = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
  return new Blob([array], { type: "image/png" });
}

function addResult(b64, infotext, seed) {
  const url = URL.createObjectURL(b64ToBlob(b64));
  const card = document.createElement("figure");
  card.className = "card";
  const img = document.createElement("img");
  img.src = url;
  img.alt = "generated image, seed " + seed;
  const caption = document.createElement("figcaption");
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = infotext;
  const link = document.createElement("a");
  link.href = url;
  link.download = "sd_mlx-" + seed + ".png";
  link.className = "download";
  link.textContent = "Download PNG";
  caption.appendChild(params);
  caption.appendChild(link);
  card.appendChild(img);
  card.appendChild(caption);
  $("gallery").prepend(card);
}

async function pollProgress() {
  try {
    const p = await call("GET", "progress");
    if (p.state.job_count > 0 && p.state.job !== "load model") {
      const percent = Math.round(p.progress * 100);
      progressSeen = Math.max(progressSeen, percent);
      document.body.dataset.maxProgress = String(progressSeen);
      $("progress-bar").style.width = percent + "%";
      const eta = p.eta_relative > 0 ? ", about " + Math.ceil(p.eta_relative) + " s left" : "";
      $("progress-text").textContent = (p.textinfo || "working") + eta;
    } else if (p.state.job === "load model") {
      $("progress-text").textContent = "loading the model\u2026";
    }
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
      $("preview-empty").hidden = true;
      previewsSeen += 1;
      document.body.dataset.previews = String(previewsSeen);
    }
  } catch (e) {
    // progress is best effort; the generate request reports real errors
  }
}

function readForm() {
  const number = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler").value,
    steps: number("steps"),
    cfg_scale: number("cfg_scale"),
    width: number("width"),
    height: number("height"),
    seed: number("seed"),
    batch_size: number("batch_size"),
    send_images: true,
    save_images: false,
  };
}

async function generate(event) {
  event.preventDefault();
  const body = readForm();
  setState("running");
  showMessage("");
  progressSeen = 0;
  previewsSeen = 0;
  document.body.dataset.maxProgress = "0";
  document.body.dataset.previews = "0";
  $("progress-bar").style.width = "0%";
  $("progress-text").textContent = "queued";
  polling = setInterval(pollProgress, 250);
  try {
    const model = $("model").value;
    if (model && model !== currentModel) {
      $("progress-text").textContent = "loading " + model + "\u2026";
      await call("POST", "options", { sd_model_checkpoint: model });
      currentModel = model;
    }
    const started = performance.now();
    const result = await call("POST", "txt2img", body);
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addResult(b64, info.infotexts[i], info.all_seeds[i]));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const wasInterrupted = document.body.dataset.interrupting === "1";
    showMessage((wasInterrupted ? "Interrupted: " : "Done: ") + result.images.length + " image(s) in " +
                seconds + " s", wasInterrupted ? "warn" : "ok");
    $("progress-bar").style.width = "100%";
    $("progress-text").textContent = wasInterrupted ? "Interrupted" : "Done";
  } catch (e) {
    showMessage(e.message, "error");
    $("progress-text").textContent = "Failed";
  } finally {
    clearInterval(polling);
    polling = null;
    document.body.dataset.interrupting = "0";
    document.body.dataset.generations = String(Number(document.body.dataset.generations || 0) + 1);
    setState("idle");
  }
}

async function interrupt() {
  document.body.dataset.interrupting = "1";
  $("interrupt").disabled = true;
  $("progress-text").textContent = "interrupting\u2026";
  try { await call("POST", "interrupt"); } catch (e) { showMessage(e.message, "error"); }
}

window.addEventListener("DOMContentLoaded", async () => {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  try {
    await loadLists();
    setState("idle");
  } catch (e) {
    $("server-status").textContent = "unreachable";
    $("server-status").className = "status error";
    showMessage("Cannot reach the server: " + e.message, "error");
  }
});
