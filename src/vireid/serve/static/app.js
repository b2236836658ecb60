// vireid search page: upload a query, POST /search, show ranked gallery thumbnails.
"use strict";

const form = document.getElementById("search-form");
const fileInput = document.getElementById("query-file");
const dropZone = document.getElementById("drop-zone");
const preview = document.getElementById("query-preview");
const dropText = document.getElementById("drop-text");
const button = document.getElementById("search-button");
const statusLine = document.getElementById("status");
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

function showResults(body) {
  results.replaceChildren();
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
    card.appendChild(text("span", "distance", "d = " + hit.distance.toFixed(4)));
    card.appendChild(text("span", "name", hit.name));
    const facts = [];
    if (hit.pid !== null) facts.push("id " + hit.pid);
    if (hit.cam !== null) facts.push("cam " + hit.cam);
    if (facts.length) card.appendChild(text("span", "facts", facts.join(" · ")));
    results.appendChild(card);
  }
  statusLine.textContent = body.results.length + " results from " + body.count + " gallery images (" +
    body.rerank + ", encode " + body.timing_ms.encode + " ms, search " + body.timing_ms.search + " ms)";
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
  indexInfo.textContent = h.count + " gallery images · index " + h.version + " · d = " + h.dim;
}).catch((error) => showIndexError(String(error)));
