// The operator page: the gateway's status and rates (GET /status of the listener that served this page, and the
// retained gateway/status), anomaly alerts (alerts/#), dead letters with their reasons (gateway/deadletter) and
// quarantined posts (quarantine/#), as they happen. Needs an operator account: deploy/mosquitto.acl grants
// `operator` these topics; other accounts are refused them.
"use strict";

(() => {
  const {el, time, parse, prepend} = View;
  const MAX_ROWS = 200;
  const POLL_MS = 2000;
  // Counters of /status shown with their rate per second (names: gateway/ops/metrics.py).
  const RATES = ["received", "appended", "delivered", "deadlettered", "alerts", "quarantined", "stats_published"];
  let previous = null;

  function cell(text, cls) {
    return el("td", {class: cls, text: String(text)});
  }

  function showStatus(s) {
    document.getElementById("health").textContent = s.healthy ? "healthy" : `unhealthy: ${s.problem}`;
    document.getElementById("health").className = s.healthy ? "good" : "bad";
    document.getElementById("offset").textContent = String(s.log_offset);
    document.getElementById("broker-link").textContent = s.mqtt_connected ? "connected" : "not connected";
    const rows = RATES.map((name) => {
      const now = (s.metrics || {})[name] || 0;
      let rate = "";
      if (previous && s.time > previous.time) {
        const before = (previous.metrics || {})[name] || 0;
        rate = ((now - before) / (s.time - previous.time)).toFixed(1);
      }
      return el("tr", {dataset: {metric: name}}, cell(name), cell(now, "num"), cell(rate, "num rate"));
    });
    document.getElementById("rates").replaceChildren(...rows);
    const consumers = Object.entries(s.consumers || {}).map(([name, c]) =>
      el("tr", {}, cell(name), cell(c.committed, "num"), cell(c.lag, "num"), cell(c.reading_back ? "reading back" : "live")));
    document.getElementById("consumers").replaceChildren(...consumers);
    const reasons = Object.entries(s.deadletter_reasons || {}).sort((a, b) => b[1] - a[1])
      .map(([reason, n]) => `${reason} ${n}`).join(", ");
    document.getElementById("reasons").textContent = reasons || "none";
    previous = s;
  }

  async function poll() {
    try {
      const resp = await fetch("/status", {cache: "no-store"});
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      showStatus(await resp.json());
    } catch (err) {
      document.getElementById("health").textContent = `no answer from the gateway (${err.message})`;
      document.getElementById("health").className = "bad";
    }
    setTimeout(poll, POLL_MS);
  }

  function values(payload) {
    return Object.entries(payload || {}).filter(([k, v]) => k !== "seq" && k !== "ts" && typeof v === "number")
      .map(([k, v]) => `${k} ${v}`).join(", ");
  }

  function alert(device, env) {
    const v = (env.verdicts || []).find((x) => x && x.detail && x.detail.episode) || (env.verdicts || [])[0] || {};
    const episode = (v.detail && v.detail.episode) || "";
    prepend(document.getElementById("alerts"), el("tr", {class: episode, dataset: {device}},
      el("td", {}, time(env.ts)), cell(device), cell(episode === "start" ? "anomaly started" : "ended"),
      cell(values(env.payload)), cell(typeof v.score === "number" ? v.score.toFixed(3) : "", "num")), MAX_ROWS);
  }

  function deadLetter(d) {
    const preview = String(d.payload || "").slice(0, 120);
    prepend(document.getElementById("deadletters"), el("tr", {dataset: {reason: String(d.reason)}},
      el("td", {}, time(d.ts || Date.now())), cell(d.origin || ""), cell(d.reason || "", "reason"),
      cell(d.message || ""), el("td", {}, el("code", {text: preview}), ` (${d.payload_bytes} bytes)`)), MAX_ROWS);
  }

  function quarantined(author, env) {
    const v = (env.verdicts || [])[0] || {};
    prepend(document.getElementById("quarantine"), el("tr", {},
      el("td", {}, time(env.ts)), cell(author), cell(String((env.payload || {}).text || "")),
      cell(typeof v.score === "number" ? v.score.toFixed(3) : "", "num")), MAX_ROWS);
  }

  function onMessage(topic, payload) {
    if (topic === "gateway/status") {
      const text = new TextDecoder().decode(payload);
      const node = document.getElementById("retained-status");
      node.textContent = text;
      node.className = text === "online" ? "good" : "bad";
      return;
    }
    const doc = parse(payload);
    if (!doc) return;
    const parts = topic.split("/");
    if (topic === "gateway/deadletter") deadLetter(doc);
    else if (parts[0] === "alerts" && parts.length === 2) alert(parts[1], doc);
    else if (parts[0] === "quarantine" && parts.length === 2) quarantined(parts[1], doc);
  }

  View.login(({url, username, password}) => {
    document.getElementById("panels").hidden = false;
    poll();
    const client = View.connect({
      url, username, password, onMessage,
      subscribe: (c) => View.subscribeAll(c, ["gateway/status", "gateway/deadletter", "alerts/#", "quarantine/#"]),
    });
    return {client};
  });
})();
