// The fastgen playground: POST /v1/images/generations with "stream": true, read the server-sent
// events with fetch (EventSource cannot POST), draw progress per candidate, then the ranked images.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "fastgen.apiKey";
  const form = $("form"), promptBox = $("prompt"), keyBox = $("api-key"), results = $("results");
  let scorer;            // undefined: not asked yet; null: no image scorer; {id, labels}
  let controller = null; // the AbortController of the request running, if any

  const oneLine = (text) => String(text).replace(/\s+/g, " ").trim();
  const setStatus = (text) => { $("status").textContent = text; };
  const showError = (text) => { $("error").textContent = text ? `Error: ${oneLine(text)}` : ""; };
  const fmt = (ms) => (ms >= 100 ? ms.toFixed(0) : ms.toFixed(1));

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = keyBox.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The one-line message of an HTTP error: the API's {"error": {"message"}} body, else the status.
  async function httpError(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON: fall back to the status line */ }
    return `HTTP ${response.status} ${response.statusText}`;
  }

  // What the server serves: the generator and whether an image scorer ranks candidates.
  async function loadModels() {
    const response = await fetch("/v1/models", { headers: headers(false) });
    if (!response.ok) throw new Error(await httpError(response));
    const models = (await response.json()).data || [];
    const generator = models.find((m) => m.kind === "generator");
    const image = models.find((m) => m.kind === "image-classifier" || m.kind === "image-detector");
    scorer = image ? { id: image.id, labels: image.labels || [] } : null;
    const select = $("rank-by");
    select.replaceChildren(...(scorer ? scorer.labels : []).map((label) => new Option(label, label)));
    $("rank-box").hidden = !(scorer && scorer.labels.length);
    $("keep").disabled = !scorer;
    $("models").textContent = [
      generator ? `Model ${generator.id}${generator.ready ? "" : " (loading)"}` : "No generator",
      scorer ? `image scorer ${scorer.id}: candidates are ranked` : "no image scorer: candidates are not ranked",
    ].join(" · ");
  }

  function refreshModels() {
    loadModels().catch((e) => {
      scorer = undefined;
      $("models").textContent = e.message.startsWith("401") ? "This server needs an API key." : oneLine(e.message);
    });
  }

  function integer(id, label) {
    const text = $(id).value.trim();
    if (text === "") return undefined;
    const value = Number(text);
    if (!Number.isInteger(value)) throw new Error(`${label}: ${text} is not a whole number`);
    return value;
  }

  function card(index) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.index = index;
    li.innerHTML = '<p class="title"></p><progress max="1" value="0"></progress><img hidden alt="">'
      + '<p class="meta"><span class="score"></span> <button type="button" class="seed" hidden></button> '
      + '<button type="button" class="replay" hidden>Replay</button></p>';
    li.querySelector(".title").textContent = `Candidate ${index + 1}`;
    li.querySelector("progress").setAttribute("aria-label", `Candidate ${index + 1} progress`);
    return li;
  }

  function showImage(li, item, prompt) {
    const img = li.querySelector("img");
    img.src = `data:image/png;base64,${item.b64_json}`;
    img.alt = `${li.querySelector(".title").textContent}: "${prompt}" (seed ${item.seed})`;
    img.hidden = false;
    const seed = li.querySelector(".seed");
    seed.textContent = `seed ${item.seed}`;
    seed.dataset.seed = item.seed;
    seed.title = "Copy the seed";
    seed.setAttribute("aria-label", `Copy seed ${item.seed}`);
    seed.hidden = false;
    const replay = li.querySelector(".replay");
    replay.dataset.seed = item.seed;
    replay.setAttribute("aria-label", `Replay seed ${item.seed}: set it in the form`);
    replay.hidden = false;
  }

  // The final, ranked images (best first); candidates that were not kept are dropped.
  function showDone(body, cards, prompt) {
    const data = body.data || [];
    const fastgen = body.fastgen || {};
    results.replaceChildren();
    data.forEach((item, place) => {
      const li = cards[item.index] || card(item.index);
      const ranked = item.rank !== null && item.rank !== undefined;
      li.querySelector(".title").textContent = ranked
        ? `#${item.rank + 1} · candidate ${item.index + 1}` : `Image ${place + 1}`;
      showImage(li, item, prompt);
      const score = li.querySelector(".score");
      if (item.score) {
        score.textContent = `${item.score.rank_by} ${item.score.value.toFixed(4)}`;
        score.dataset.value = item.score.value;
        score.title = (item.score.top || []).map((t) => `${t.label} ${t.prob.toFixed(3)}`).join(", ");
      }
      li.dataset.rank = ranked ? item.rank : "";
      results.append(li);
    });
    const lat = fastgen.latency_ms || {};
    const parts = Object.entries(lat).filter(([name]) => name !== "step").map(([name, ms]) => `${name} ${fmt(ms)} ms`);
    // Steps as the progress events counted them (a scheduler may run more than asked), else as asked.
    const steps = Math.max(0, ...cards.map((li) => Number(li.querySelector("progress").max))) || fastgen.steps;
    if (lat.step !== undefined) {
      parts.push(`${fmt(lat.step)} ms per step`);
    } else if (lat.generation && steps > 1) {
      parts.push(`≈ ${fmt(lat.generation / steps)} ms per step (generation / ${steps} steps)`);
    }
    $("latency").textContent = parts.length ? `Latency: ${parts.join(" · ")}` : "";
    setStatus(`Done: ${data.length} image${data.length === 1 ? "" : "s"}${
      data.some((d) => d.score) ? ", ranked by the scorer" : ""}.`);
  }

  // Reads "event: NAME\ndata: JSON\n\n" blocks; onEvent returns true to stop (done, error).
  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;  // a keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
        if (data.length && onEvent(name, JSON.parse(data.join("\n")))) {
          await reader.cancel();
          return true;
        }
      }
    }
  }

  function busy(on) {
    $("generate").disabled = on;
    $("cancel").disabled = !on;
    form.setAttribute("aria-busy", on ? "true" : "false");
  }

  async function generate(event) {
    event.preventDefault();
    if (controller) return;
    showError("");
    const prompt = promptBox.value.trim();
    let body;
    try {
      if (!prompt) throw new Error("prompt: enter a prompt");
      const count = integer("candidates", "candidates") || 1;
      body = { prompt, stream: true, response_format: "b64_json" };
      if (scorer === undefined) await loadModels();
      if (scorer) {
        Object.assign(body, { candidates: count, keep: integer("keep", "keep") || 1, scorer: scorer.id });
        if ($("rank-by").value) body.rank_by = $("rank-by").value;
      } else {
        body.n = count;
      }
      const steps = integer("steps", "steps"), seed = integer("seed", "seed");
      if (steps !== undefined) body.steps = steps;
      if (seed !== undefined) body.seed = seed;
      const size = $("size").value.trim();
      if (size) body.size = size;
    } catch (e) {
      showError(e.message);
      return;
    }
    const count = body.candidates || body.n;
    const cards = Array.from({ length: count }, (_, i) => card(i));
    results.replaceChildren(...cards);
    $("latency").textContent = "";
    setStatus(`Generating ${count} image${count === 1 ? "" : "s"}…`);
    controller = new AbortController();
    busy(true);
    try {
      const response = await fetch("/v1/images/generations", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) {
        results.replaceChildren();
        setStatus("");
        showError(await httpError(response));
        return;
      }
      const finished = await readEvents(response, (name, data) => {
        if (name === "progress") {
          const bar = cards[data.candidate] && cards[data.candidate].querySelector("progress");
          if (bar) { bar.max = data.steps; bar.value = data.step; }
        } else if (name === "image") {
          if (cards[data.index]) showImage(cards[data.index], data, prompt);
        } else if (name === "done") {
          showDone(data, cards, prompt);
          return true;
        } else if (name === "error") {
          setStatus("");
          showError((data.error && data.error.message) || "the server reported an error");
          return true;
        }
        return false;
      });
      if (!finished) showError("the stream ended before the images were done");
    } catch (e) {
      if (e.name === "AbortError") setStatus("Cancelled.");
      else { setStatus(""); showError(`network: ${e.message}`); }
    } finally {
      controller = null;
      busy(false);
    }
  }

  results.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button || !button.dataset.seed) return;
    const seed = button.dataset.seed;
    if (button.classList.contains("replay")) {
      // That seed alone, with the same settings, makes the same image again.
      $("seed").value = seed;
      $("candidates").value = 1;
      $("keep").value = 1;
      setStatus(`Seed ${seed} set with 1 candidate: Generate makes that image again.`);
      $("seed").focus();
    } else {
      const copied = navigator.clipboard ? navigator.clipboard.writeText(seed) : Promise.reject();
      copied.then(() => setStatus(`Seed ${seed} copied.`), () => setStatus(`Seed ${seed} (could not copy it).`));
    }
  });

  form.addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => controller && controller.abort());
  promptBox.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && controller) controller.abort();
  });
  keyBox.value = sessionStorage.getItem(KEY_STORE) || "";
  keyBox.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, keyBox.value));
  keyBox.addEventListener("change", refreshModels);
  refreshModels();
})();
