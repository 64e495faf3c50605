// forklift dashboard: polls /dashboard/state once a second and redraws. No dependencies.
// Every value from the server goes into the page as text (textContent), never as HTML.
"use strict";

(function () {
  const POLL_MS = 1000;
  const STATE_URL = "dashboard/state"; // relative: works behind a proxy's path prefix too

  function $(id) {
    return document.getElementById(id);
  }

  // el("td", {className: "x", dataset: {jobId: "1"}}, "text", otherNode)
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") {
        Object.assign(node.dataset, value);
      } else if (key === "title") {
        node.title = value;
      } else {
        node[key] = value;
      }
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.round(s - m * 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function fmtClock(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toLocaleTimeString();
  }

  function statusPill(status) {
    return el("span", { className: "status status-" + status }, status);
  }

  function renderQueues(queues) {
    const total = queues.reduce((acc, q) => acc + q.depth, 0);
    $("queued-total").textContent = total;
    $("queues").replaceChildren(
      ...queues.map((q) =>
        el("tr", { dataset: { queue: q.name } }, el("td", { className: "mono" }, q.name),
          el("td", { className: "queue-depth" }, q.depth))
      )
    );
  }

  function renderTotals(state) {
    const running = state.totals.running;
    const slots = state.workers
      .filter((w) => w.online)
      .reduce((acc, w) => acc + w.concurrency, 0);
    $("running-total").textContent = running;
    $("slots").textContent = "of " + slots + " slot" + (slots === 1 ? "" : "s") + " online";
    const fin = state.totals.finished;
    const done = Object.values(fin).reduce((a, b) => a + b, 0);
    $("finished-total").textContent = done;
    $("finished-split").textContent = ["succeeded", "failed", "cancelled"]
      .map((s) => (fin[s] || 0) + " " + s)
      .join(" · ");
  }

  function renderShm(shm, localDomain) {
    $("shm").replaceChildren(
      ...shm.map((d) => {
        const limit = d.limit;
        const frac = limit ? Math.min(1, d.bytes / limit) : 0;
        const bar = el("div", { className: "bar" }, el("div"));
        bar.firstChild.style.width = (frac * 100).toFixed(1) + "%";
        if (frac > 0.9) bar.classList.add("full");
        else if (frac > 0.7) bar.classList.add("warn");
        const label =
          fmtBytes(d.bytes) +
          (limit ? " of " + fmtBytes(limit) + " (" + (frac * 100).toFixed(1) + "%)" : "") +
          " · " + d.segments + " segment" + (d.segments === 1 ? "" : "s");
        return el(
          "div",
          { className: "shm-domain", dataset: { domain: d.domain } },
          el("div", {}, el("span", { className: "mono" }, d.domain),
            d.domain === localDomain ? el("span", { className: "muted" }, " (this API)") : null,
            " — ", el("span", { className: "shm-label" }, label)),
          limit ? bar : null
        );
      })
    );
  }

  function renderWorkers(state) {
    const rows = state.workers.map((w) => {
      const jobs = w.jobs.map((j) =>
        el("span", { className: "job-chip mono", title: j.id || "" }, j.task + shortId(j.id, 8) +
          " · " + fmtSeconds(state.now - j.started_at))
      );
      return el(
        "tr",
        { dataset: { worker: w.name }, className: w.online ? "" : "offline" },
        el("td", { className: "mono" }, w.name),
        el("td", { className: "mono" }, w.domain),
        el("td", {}, w.jobs.length + " / " + w.concurrency),
        el("td", {}, w.online ? w.last_seen_s.toFixed(0) + " s ago" : "offline"),
        el("td", {}, jobs.length ? jobs : el("span", { className: "muted" }, "idle"))
      );
    });
    for (const j of state.running_elsewhere) {
      rows.push(el("tr", {}, el("td", { className: "muted" }, "(unknown worker)"), el("td"),
        el("td"), el("td"), el("td", {}, el("span", { className: "job-chip mono" },
          j.task + shortId(j.id, 8)))));
    }
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colSpan: 5, className: "muted" }, "no worker online")));
    }
    $("workers").replaceChildren(...rows);
  }

  // Open API (no keys): the state has counts, not ids (anyone can read it).
  function shortId(id, n) {
    return id ? " " + id.slice(0, n) : "";
  }

  function renderJobs(state) {
    if (state.jobs_hidden) {
      const counts = Object.entries(state.recent_counts || {})
        .map(([status, n]) => n + " " + status).join(" · ");
      $("jobs").replaceChildren(el("tr", { id: "jobs-hidden" }, el("td", { colSpan: 7 },
        (counts || "no jobs yet") + " — job ids are listed only when the API has keys" +
        " (FORKLIFT_API_KEYS)")));
      return;
    }
    const rows = state.jobs.map((j) => {
      let duration = fmtSeconds(j.duration);
      if (j.status === "running" && j.progress !== null) {
        duration += " · " + Math.round(j.progress * 100) + "%";
      }
      return el(
        "tr",
        { dataset: { jobId: j.id, status: j.status } },
        el("td", { className: "mono", title: j.id }, j.id.slice(0, 12)),
        el("td", {}, j.task),
        el("td", { className: "job-status" }, statusPill(j.status)),
        el("td", { className: "job-duration" }, duration),
        el("td", { className: "mono" }, j.worker || "–"),
        el("td", {}, fmtClock(j.created_at)),
        el("td", { className: "error", title: j.error || "" }, j.error || "")
      );
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colSpan: 7, className: "muted" }, "no jobs yet")));
    }
    $("jobs").replaceChildren(...rows);
  }

  function drawSparkline(counts, slotSeconds) {
    const canvas = $("sparkline");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 360;
    const height = canvas.clientHeight || 64;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const max = Math.max(1, ...counts);
    const pad = 4;
    const step = counts.length > 1 ? (width - 2 * pad) / (counts.length - 1) : 0;
    const y = (v) => height - pad - (v / max) * (height - 2 * pad);
    ctx.beginPath();
    counts.forEach((v, i) => {
      const x = pad + i * step;
      if (i === 0) ctx.moveTo(x, y(v));
      else ctx.lineTo(x, y(v));
    });
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "#2f6fdf";
    ctx.stroke();
    ctx.lineTo(pad + (counts.length - 1) * step, height - pad);
    ctx.lineTo(pad, height - pad);
    ctx.closePath();
    ctx.fillStyle = "rgba(47, 111, 223, 0.12)";
    ctx.fill();
    const last = counts.length ? counts[counts.length - 1] : 0;
    const minutes = Math.round((counts.length * slotSeconds) / 60);
    $("tp-label").textContent =
      "jobs finished per " + slotSeconds + " s over " + minutes + " min · latest " + last +
      " · peak " + Math.max(0, ...counts);
    canvas.dataset.counts = counts.join(",");
  }

  function setConnection(ok, text) {
    const badge = $("conn");
    badge.className = "badge " + (ok ? "badge-ok" : "badge-bad");
    badge.textContent = text;
  }

  function render(state) {
    renderQueues(state.queues);
    renderTotals(state);
    renderShm(state.shm, state.domain);
    renderWorkers(state);
    renderJobs(state);
    drawSparkline(state.throughput.counts, state.throughput.slot_s);
    setConnection(true, "live");
    $("updated").textContent = "updated " + fmtClock(state.now);
    document.body.dataset.updatedAt = String(state.now);
  }

  const KEY_STORE = "forklift.apiKey";

  function authHeaders() {
    const key = window.sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  $("keyform").addEventListener("submit", function (event) {
    event.preventDefault();
    window.sessionStorage.setItem(KEY_STORE, $("apikey").value);
    $("apikey").value = "";
    $("keyform").hidden = true;
  });

  async function poll() {
    let response = null;
    let body = null;
    try {
      response = await fetch(STATE_URL, { cache: "no-store", headers: authHeaders() });
      body = await response.json();
    } catch (err) {
      setConnection(false, "no connection");
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
    if (body === null) return;
    // Outside the try: a bug in rendering must surface in the console, not pass as "offline".
    if (response.ok) {
      render(body);
    } else if (response.status === 401) {
      $("keyform").hidden = false;
      setConnection(false, "API key needed");
    } else {
      const error = body.error && body.error.message ? body.error.message : body.error;
      setConnection(false, error || "HTTP " + response.status);
    }
  }

  poll();
})();
