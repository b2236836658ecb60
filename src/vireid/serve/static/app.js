// vireid search page: upload a query, POST /search, show ranked gallery thumbnails.
"use strict";

const form = document.getElementById("search-form");
const fileInput = document.getElementById("query-file");
const dropZone = document.getElementById("drop-zone");
const preview = document.getElementById("query-preview");
const dropText = document.getElementById("drop-text");
const button = document.getElementById("search-button");
const statusLine = document.getElementById("status");
const distanceNote = document.getElementById("distance-note");
const results = document.getElementById("results");
const indexInfo = document.getElementById("index-info");
const tokenField = document.getElementById("token-field");
const tokenInput = document.getElementById("token");
let queryFile = null;
let readsNeedToken = false;

tokenInput.value = sessionStorage.getItem("vireid-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("vireid-token", tokenInput.value));

function authHeaders() {
  return readsNeedToken && tokenInput.value ? { Authorization: "Bearer " + tokenInput.value } : {};
}

// Thumbnails behind a token cannot be plain <img src> links: fetch them with the header.
async function loadThumbnail(img, url) {
  if (!readsNeedToken) { img.src = url; return; }
  const response = await fetch(url, { headers: authHeaders() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function setQuery(file) {
  if (!file) return;
  queryFile = file;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  dropText.textContent = file.name;
  button.disabled = false;
}

fileInput.addEventListener("change", () => setQuery(fileInput.files[0]));
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("over"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  setQuery(event.dataTransfer.files[0]);
});

function text(tag, className, value) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = value;
  return node;
}

// What the distance of each re-ranking means (the API's "distance": >= 0, smaller = closer).
const DISTANCE_MEANING = {
  plain: "1 − cosine similarity (0 to 2)",
  aim: "2 − affinity − cosine similarity (AIM; 0 to 4)",
  sgr: "mean length of the shortest graph paths from the query (SGR)",
  mnnr: "α · Euclidean distance + (1 − α) · Jaccard distance of the neighbourhoods (MNNR)",
  sim: "α · SGR distance + (1 − α) · Jaccard distance of the neighbourhoods (SIM)",
  krr: "(1 − λ) · Jaccard distance + λ · Euclidean distance (k-reciprocal)",
};

// A file name that may wrap after "_", "-", "." and "/" (a <wbr> after each), never inside a word
// unless a single word is wider than the card; the full name is the tooltip.
function fileName(name) {
  const node = document.createElement("span");
  node.className = "name";
  node.title = name;
  for (const part of name.split(/(?<=[_\-./])/)) {
    if (node.childNodes.length) node.appendChild(document.createElement("wbr"));
    node.appendChild(document.createTextNode(part));
  }
  return node;
}

function showResults(body) {
  results.replaceChildren();
  const meaning = DISTANCE_MEANING[body.rerank] || "";
  for (const hit of body.results) {
    const card = document.createElement("li");
    card.className = "hit";
    card.dataset.id = hit.id;
    if (hit.thumbnail_url) {
      const img = document.createElement("img");
      img.alt = hit.name;
      loadThumbnail(img, hit.thumbnail_url);
      card.appendChild(img);
    }
    card.appendChild(text("span", "rank", "#" + hit.rank));
    const distance = text("span", "distance", "distance " + hit.distance.toFixed(4));
    distance.title = "smaller = closer; " + body.rerank + ": " + meaning;
    card.appendChild(distance);
    const facts = [];
    if (hit.pid != null) facts.push("person " + hit.pid);
    if (hit.cam != null) facts.push("camera " + hit.cam);
    if (facts.length) card.appendChild(text("span", "facts", facts.join(" · ")));
    card.appendChild(fileName(hit.name));
    results.appendChild(card);
  }
  statusLine.textContent = body.results.length + " results from " + body.count + " gallery images (" +
    body.rerank + ", encode " + body.timing_ms.encode + " ms, search " + body.timing_ms.search + " ms)";
  distanceNote.textContent = "Distance: smaller = closer; comparable within one re-ranking only. " +
    body.rerank + ": " + meaning + ".";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!queryFile) return;
  const data = new FormData();
  data.append("image", queryFile, queryFile.name);
  data.append("modality", document.getElementById("modality").value);
  data.append("rerank", document.getElementById("rerank").value);
  data.append("topk", document.getElementById("topk").value);
  button.disabled = true;
  statusLine.textContent = "searching…";
  try {
    const response = await fetch("/search", { method: "POST", body: data, headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) {
      results.replaceChildren();
      distanceNote.textContent = "";
      statusLine.textContent = "Error " + response.status + ": " + body.detail;
    } else {
      showResults(body);
    }
  } catch (error) {
    statusLine.textContent = "Request failed: " + error;
  } finally {
    button.disabled = false;
  }
});

function showIndexError(reason) {
  indexInfo.textContent = "index unavailable: " + reason;
  indexInfo.classList.add("error");
}

fetch("/health").then(async (response) => {
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (error) { /* not JSON */ }
    showIndexError("HTTP " + response.status + " " + detail);
    return;
  }
  const h = await response.json();
  readsNeedToken = Boolean(h.auth && h.auth.reads);
  tokenField.hidden = !readsNeedToken;
  indexInfo.textContent = h.count + " gallery images · index " + h.version + " · " + h.dim + "-dimensional features";
}).catch((error) => showIndexError(String(error)));
