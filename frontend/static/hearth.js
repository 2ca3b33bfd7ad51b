// Hearth pages' progressive enhancement: everything works without it; with it, pages stay live.
//  - [data-live="N"]: re-fetch this page every N seconds and swap in the element with the same id.
//  - [data-ws="/ws/..."]: the job page's websocket; it fills [data-live-field] parts in place.
//  - [data-copy="#id"]: copy that element's text to the clipboard.
//  - form#new-job: estimate the price from the lines typed, before submitting.
"use strict";

function liveSections() {
  document.querySelectorAll("[data-live]").forEach((section) => {
    const every = Math.max(1, Number(section.dataset.live)) * 1000;
    const refresh = async () => {
      try {
        const response = await fetch(location.href, { headers: { "X-Hearth-Live": "1" }, credentials: "same-origin" });
        if (response.ok) {
          const page = new DOMParser().parseFromString(await response.text(), "text/html");
          const fresh = page.getElementById(section.id);
          const current = document.getElementById(section.id);
          if (fresh && current && !current.contains(document.activeElement)) current.replaceWith(fresh);
        }
      } catch (err) { /* offline for a moment: try again on the next tick */ }
      setTimeout(refresh, every);
    };
    setTimeout(refresh, every);
  });
}

function jobSocket() {
  const section = document.querySelector("[data-ws]");
  if (!section) return;
  const field = (name) => section.querySelector(`[data-live-field="${name}"]`);
  let delay = 500;
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}${section.dataset.ws}`);
    socket.onopen = () => { delay = 500; };
    socket.onmessage = (event) => {
      const job = JSON.parse(event.data);
      field("status").textContent = job.status;
      field("status").className = `status ${job.status}`;
      field("bar").setAttribute("aria-valuenow", job.percent);
      field("bar").querySelector(".fill").style.width = `${job.percent}%`;
      field("percent").textContent = job.percent;
      field("items").textContent = `${job.items_done} / ${job.items_total}`;
      field("energy").textContent = job.energy_wh;
      field("spent").textContent = job.spent;
      field("failure").textContent = job.failure_reason;
      field("failure").hidden = !job.failure_reason;
      field("download").hidden = job.status !== "succeeded";
      if (job.finished && field("cancel")) field("cancel").remove();
      const timeline = field("timeline");
      job.timeline.forEach((task) => {
        const square = timeline.children[task.index];
        if (square) {
          square.className = task.status;
          square.title = `task ${task.index}: ${task.status}${task.host ? " on " + task.host : ""}`;
        }
      });
      section.dataset.status = job.status;
    };
    socket.onclose = (event) => {
      if (event.code === 4404 || section.dataset.status && ["succeeded", "failed", "cancelled"].includes(section.dataset.status)) return;
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  connect();
}

function copyButtons() {
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", async () => {
      const text = document.querySelector(button.dataset.copy).textContent.trim();
      try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
      catch (err) {
        const range = document.createRange();
        range.selectNodeContents(document.querySelector(button.dataset.copy));
        getSelection().removeAllRanges(); getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  });
}

function priceEstimate() {
  const form = document.getElementById("new-job");
  if (!form || !form.dataset.priceLow) return;
  const low = Number(form.dataset.priceLow), high = Number(form.dataset.priceHigh);
  const out = document.getElementById("estimate");
  const currency = form.dataset.currency || "";
  // Small jobs cost fractions of a cent: show them rather than 0.00.
  const money = (minor) => `${(minor / 100).toFixed(minor < 100 ? 4 : 2)} ${currency}`;
  let fileLines = 0;
  const update = () => {
    const text = form.elements["inputs_text"].value;
    const items = fileLines || text.split("\n").filter((line) => line.trim()).length;
    const level = form.elements["verification"].value;
    let runs = 1;
    if (level === "redundant") runs = Number(form.elements["replicas"].value) || 2;
    if (level === "spot") runs = 1 + (Number(form.elements["spot_fraction"].value) || 0.05);
    if (!items) { out.textContent = `Hosts ask ${money(low)} – ${money(high)} per 1,000 items.`; return; }
    const cap = Number(form.elements["max_price_per_1k"].value) * 100 || Infinity;
    const top = Math.min(high, cap);
    out.innerHTML = "";
    out.append("Estimated price for " + items + " items: ");
    const strong = document.createElement("strong");
    strong.textContent = `${money(low * items * runs / 1000)} – ${money(Math.max(low, top) * items * runs / 1000)}`;
    out.append(strong);
  };
  form.addEventListener("input", update);
  form.elements["inputs_file"].addEventListener("change", async (event) => {
    const file = event.target.files[0];
    fileLines = file ? (await file.text()).split("\n").filter((line) => line.trim()).length : 0;
    update();
  });
  update();
}

document.addEventListener("DOMContentLoaded", () => { liveSections(); jobSocket(); copyButtons(); priceEstimate(); });
