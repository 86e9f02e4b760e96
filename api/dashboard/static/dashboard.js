// llm-gateway dashboard: small progressive enhancements, no dependencies.
"use strict";

// Queues: re-render the live part every 2 s (the server renders it; this only swaps it in).
(function liveQueues() {
  const box = document.getElementById("queues-live");
  if (!box) return;
  let timer = null;
  async function refresh() {
    try {
      const r = await fetch(box.dataset.live, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { box.insertAdjacentHTML("afterbegin", '<p class="error">Your session ended: <a href="login">log in again</a>.</p>'); return; }
      if (r.ok) box.innerHTML = await r.text();
    } catch (e) { /* the gateway restarting: try again next tick */ }
    timer = setTimeout(refresh, 2000);
  }
  timer = setTimeout(refresh, 2000);
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { clearTimeout(timer); } else { clearTimeout(timer); refresh(); }
  });
})();

// Destructive forms ask first.
document.querySelectorAll("form[data-confirm]").forEach((form) => {
  form.addEventListener("submit", (e) => { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
});

// Copy a shown-once secret; carry it to the Playground in this tab only (sessionStorage).
document.querySelectorAll("[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
    catch (e) { window.getSelection().selectAllChildren(document.getElementById(button.dataset.copy)); }
  });
});
document.querySelectorAll("[data-use-key]").forEach((link) => {
  link.addEventListener("click", () => {
    sessionStorage.setItem("gw-playground-key", document.getElementById(link.dataset.useKey).textContent);
  });
});

// Playground: stream an answer from /v1/chat/completions and time it.
(function playground() {
  const form = document.getElementById("playground");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const keyInput = $("pg-key");
  keyInput.value = sessionStorage.getItem("gw-playground-key") || "";
  keyInput.addEventListener("change", () => sessionStorage.setItem("gw-playground-key", keyInput.value));
  let controller = null;
  const ms = (t) => (t < 1000 ? `${Math.round(t)} ms` : `${(t / 1000).toFixed(2)} s`);

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const answer = $("pg-answer");
    answer.textContent = "";
    ["t-status", "t-first", "t-total", "t-chunks", "t-tokens", "t-served", "t-job"].forEach((id) => { $(id).textContent = "…"; });
    controller = new AbortController();
    $("pg-send").disabled = true; $("pg-stop").disabled = false;
    const headers = { "Content-Type": "application/json" };
    if (keyInput.value.trim()) headers.Authorization = `Bearer ${keyInput.value.trim()}`;
    const body = { model: $("pg-model").value, stream: true, stream_options: { include_usage: true },
                   max_tokens: parseInt($("pg-max").value, 10) || 200,
                   messages: [{ role: "user", content: $("pg-prompt").value }] };
    const started = performance.now();
    let first = null, chunks = 0;
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
      $("t-status").textContent = String(r.status);
      const job = r.headers.get("x-gateway-job-id");
      $("t-job").innerHTML = job ? `<a href="jobs/${encodeURIComponent(job)}">${job.slice(0, 16)}…</a>` : "—";
      $("t-served").textContent = r.headers.get("x-gateway-provider") ? `${r.headers.get("x-gateway-provider")} / ${r.headers.get("x-gateway-model") || ""}` : "—";
      if (!r.ok || !r.body) {
        const text = await r.text();
        try { answer.textContent = JSON.parse(text).error.message; } catch (_) { answer.textContent = text; }
        answer.classList.add("failed");
        return;
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            let chunk; try { chunk = JSON.parse(data); } catch (_) { continue; }
            if (chunk.error) { answer.textContent += `\n[error] ${chunk.error.message || JSON.stringify(chunk.error)}`; continue; }
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) { first = performance.now() - started; $("t-first").textContent = ms(first); }
              chunks += 1; $("t-chunks").textContent = String(chunks);
              answer.textContent += delta.content;
            }
            if (chunk.usage) $("t-tokens").textContent = `${chunk.usage.prompt_tokens} / ${chunk.usage.completion_tokens}`;
          }
        }
        $("t-total").textContent = ms(performance.now() - started);
      }
      $("t-total").textContent = ms(performance.now() - started);
      if (first === null) $("t-first").textContent = "—";
      if ($("t-tokens").textContent === "…") $("t-tokens").textContent = "—";
      if (!chunks) $("t-chunks").textContent = "0";
      answer.dataset.done = "1";
    } catch (err) {
      if (err.name !== "AbortError") answer.textContent += `\n[${err.message}]`;
      $("t-total").textContent = ms(performance.now() - started) + (err.name === "AbortError" ? " (stopped)" : "");
    } finally {
      $("pg-send").disabled = false; $("pg-stop").disabled = true; controller = null;
    }
  });
  $("pg-stop").addEventListener("click", () => { if (controller) controller.abort(); });
})();
