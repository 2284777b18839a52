// saealign web page: plain JS, no build step. Talks to the same deployment that serves it.
// Query parameters fill the form: ?prompt=..&topic=..&methods=swap,clamp&max_new_tokens=8&seed=0
// &stream=1&autorun=1 (autorun presses Generate once the topics are loaded).
"use strict";

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const msg = (data.error && data.error.message) || resp.statusText;
    throw new Error(`${resp.status}: ${msg}`);
  }
  return data;
}

function colour(c) {
  return `hsl(${Math.round(120 * (1 - Math.min(Math.max(c, 0), 1)))}, 65%, 80%)`;
}

function tokenSpan(token, c, changed) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = token;
  if (c === null || c === undefined) {
    span.classList.add("nan");
    span.title = "contamination: not measured";
  } else {
    span.style.background = colour(c);
    span.dataset.c = c.toFixed(4);
    span.title = `contamination ${c.toFixed(3)}` + (changed == null ? "" : `, latents changed ${changed}`);
  }
  return span;
}

function outputBox(method) {
  const box = document.createElement("div");
  box.className = "output";
  box.dataset.method = method;
  box.innerHTML = `<h3><span class="method"></span><span class="stats"></span></h3>` +
    `<div class="text"><span class="prompt"></span></div>`;
  box.querySelector(".method").textContent = method;
  box.querySelector(".prompt").textContent = $("#prompt").value;
  $("#outputs").appendChild(box);
  return box;
}

function finishBox(box, result) {
  const mean = result.mean_contamination;
  const perTok = result.timings && result.timings.s_per_token;
  box.querySelector(".stats").textContent =
    (mean == null ? "contamination n/a" : `contamination ${mean.toFixed(3)}`) +
    (perTok ? ` · ${(1000 * perTok).toFixed(0)} ms/token` : "");
  box.dataset.done = "1";
}

function fillBox(box, result) {
  const text = box.querySelector(".text");
  result.tokens.forEach((tok, i) => {
    text.appendChild(tokenSpan(tok, result.contamination[i], result.latents_changed[i]));
  });
  finishBox(box, result);
}

function request() {
  const methods = [...document.querySelectorAll("#methods input:checked")].map((el) => el.value);
  return {
    prompt: $("#prompt").value,
    topic: $("#topic").value || null,
    methods,
    max_new_tokens: Number($("#max-new-tokens").value),
    seed: Number($("#seed").value),
    temperature: Number($("#temperature").value),
    top_k: Number($("#top-k").value),
    options: { keep_error: $("#keep-error").checked },
  };
}

async function streamInto(box, body) {
  const resp = await fetch("generate/stream", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!resp.ok) {
    const data = await resp.json().catch(() => ({}));
    throw new Error(`${resp.status}: ${(data.error && data.error.message) || resp.statusText}`);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const text = box.querySelector(".text");
  let buffer = "";
  let result = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = (frame.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((frame.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (event === "token") text.appendChild(tokenSpan(data.token, data.contamination, data.latents_changed));
      else if (event === "done") { finishBox(box, data); result = data; }
      else if (event === "error") throw new Error(data.error.message);
    }
  }
  return result;
}

async function run(ev) {
  if (ev) ev.preventDefault();
  const body = request();
  $("#outputs").innerHTML = "";
  $("#run").disabled = true;
  document.body.dataset.state = "running";
  setStatus("generating…");
  try {
    const methods = ["orig", ...body.methods.filter((m) => m !== "orig")];
    let results;
    if ($("#stream").checked) {
      const { methods: _, ...one } = body;
      results = await Promise.all(methods.map((m) => streamInto(outputBox(m), { ...one, method: m })));
    } else {
      results = (await api("compare", body)).results;
      results.forEach((r) => fillBox(outputBox(r.method), r));
    }
    const serverS = Math.max(...results.map((r) => (r && r.timings ? r.timings.request_s : 0)));
    const batch = Math.max(...results.map((r) => (r && r.timings ? r.timings.batch_size : 1)));
    setStatus(`done: ${results.length} outputs in ${serverS.toFixed(1)} s on the server (batch of ${batch})`);
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(String(err.message || err), true);
    document.body.dataset.state = "error";
  } finally {
    $("#run").disabled = false;
  }
}

async function showTopLatents(topic) {
  const tbody = $("#top-latents tbody");
  tbody.innerHTML = "";
  $("#top-topic").textContent = topic ? `(${topic})` : "(pick a topic)";
  if (!topic) return;
  const info = await api(`topics/${encodeURIComponent(topic)}?top=15`);
  for (const row of info.top) {
    const tr = document.createElement("tr");
    for (const v of [row.latent, row.score.toFixed(3), row.support ?? ""]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

async function loadTopics(select) {
  const data = await api("topics");
  const el = $("#topic");
  const keep = select ?? el.value;
  el.innerHTML = '<option value="">(none)</option>';
  for (const t of data.topics) {
    const opt = document.createElement("option");
    opt.value = t.topic;
    opt.textContent = `${t.topic} (${t.n_align ?? "?"} texts)`;
    el.appendChild(opt);
  }
  if ([...el.options].some((o) => o.value === keep)) el.value = keep;
  else if (data.topics.length) el.value = data.topics[0].topic;
  await showTopLatents(el.value);
}

async function newTopic(ev) {
  ev.preventDefault();
  const status = $("#topic-status");
  const name = $("#new-topic-name").value.trim();
  const texts = $("#new-topic-texts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  $("#new-topic-run").disabled = true;
  status.textContent = `scoring ${name} from ${texts.length} texts…`;
  status.classList.remove("error");
  try {
    const info = await api("topics", { name, texts, min_support: Number($("#new-topic-support").value) });
    status.textContent = `scored ${info.topic}: ${info.n_scored} latents`;
    await loadTopics(info.topic);
  } catch (err) {
    status.textContent = String(err.message || err);
    status.classList.add("error");
  } finally {
    $("#new-topic-run").disabled = false;
  }
}

function applyQuery() {
  if (params.has("prompt")) $("#prompt").value = params.get("prompt");
  if (params.has("methods")) {
    const wanted = new Set(params.get("methods").split(","));
    document.querySelectorAll("#methods input").forEach((el) => { el.checked = wanted.has(el.value); });
  }
  const numbers = { max_new_tokens: "#max-new-tokens", seed: "#seed", temperature: "#temperature", top_k: "#top-k" };
  for (const [key, sel] of Object.entries(numbers)) if (params.has(key)) $(sel).value = params.get(key);
  if (params.get("stream") === "1") $("#stream").checked = true;
}

async function init() {
  applyQuery();
  $("#form").addEventListener("submit", run);
  $("#topic-form").addEventListener("submit", newTopic);
  $("#topic").addEventListener("change", (ev) => showTopLatents(ev.target.value).catch((e) => setStatus(e.message, true)));
  try {
    const h = await api("healthz");
    $("#health").textContent = `${h.model} · SAE ${h.sae} at ${h.hook} · ${h.topics.length} topics`;
    await loadTopics(params.get("topic") || undefined);
  } catch (err) {
    setStatus(String(err.message || err), true);
  }
  if (params.get("autorun") === "1") await run();
}

init();
