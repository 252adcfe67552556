// A user's timeline: the posts of the people they follow and the readings and anomaly alerts of the devices they
// follow, as the gateway delivers them to feeds/{user}/#; live counts from events/{id}/stats; like, unlike and
// repost as real interactions on users/{user}/interactions; the user's own blocked posts (quarantine/{user} and
// the notice on feeds/{user}/notices). Topics and payloads: README "Topics".
"use strict";

(() => {
  const {el, time, parse, prepend, publish} = View;
  const MAX_ITEMS = 200;    // timeline entries kept (each post holds a stats subscription)
  const MAX_DEVICES = 100;  // rows of the devices table
  const timeline = document.getElementById("timeline");
  const devices = document.getElementById("devices");
  const items = new Map();  // event id -> its <article>
  let me = null;
  let client = null;

  function statsTopic(id) {
    return `events/${id}/stats`;
  }

  function status(text) {
    document.getElementById("status").textContent = text;
  }

  function drop(node) {
    items.delete(node.dataset.id);
    if (node.dataset.kind === "post" && client) client.unsubscribe(statsTopic(node.dataset.id));
  }

  function add(id, node) {
    node.dataset.id = id;
    node.dataset.arrived = String(Date.now());
    items.set(id, node);
    prepend(timeline, node, MAX_ITEMS, drop);
  }

  function verdict(env, label) {
    return (env.verdicts || []).find((v) => v && v.label === label);
  }

  function interact(type, id, button, after) {
    button.disabled = true;
    publish(client, `users/${me}/interactions`, {type, event_id: id}, (err) => {
      button.disabled = false;
      if (err) status(`${type} not sent: ${err.message}`);
      else after();
    });
  }

  function post(env, author) {
    const id = env.id;
    const payload = env.payload || {};
    const text = el("p", {class: "text", text: String(payload.text || "")});
    const sensitive = verdict(env, "sensitive");
    const header = el("header", {},
      el("span", {class: "author", text: author}), " ", time(env.ts),
      payload.sponsor ? el("span", {class: "badge", text: `sponsored by ${payload.sponsor}`}) : null,
      payload.reply_to ? el("span", {class: "badge", text: "reply"}) : null,
      sensitive ? el("span", {class: "badge sensitive", text: "sensitive"}) : null);
    let reveal = null;
    if (sensitive) {
      // Marked by the content model: the text is there, behind a click.
      text.hidden = true;
      reveal = el("button", {class: "reveal", type: "button", text: "Show sensitive post", onclick: () => {
        text.hidden = false;
        reveal.remove();
      }});
    }
    const count = (name) => el("span", {class: `count ${name}`, dataset: {n: "0"}, text: "0"});
    const like = el("button", {class: "like", type: "button", text: "Like", "aria-pressed": "false"});
    like.addEventListener("click", () => {
      const liked = like.getAttribute("aria-pressed") === "true";
      interact(liked ? "unlike" : "like", id, like, () => {
        like.setAttribute("aria-pressed", liked ? "false" : "true");
        like.textContent = liked ? "Like" : "Unlike";
      });
    });
    const repost = el("button", {class: "repost", type: "button", text: "Repost"});
    repost.addEventListener("click", () => interact("repost", id, repost, () => {
      repost.textContent = "Reposted";
      repost.disabled = true;
    }));
    const footer = el("footer", {},
      count("likes"), " likes · ", count("reposts"), " reposts · ", count("replies"), " replies ", like, repost);
    const node = el("article", {class: "post", dataset: {kind: "post", author}}, header, reveal, text, footer);
    add(id, node);
    client.subscribe(statsTopic(id), {qos: 1});  // retained: the current counts arrive at once
  }

  function stats(id, doc) {
    const node = items.get(id);
    if (!node || node.dataset.kind !== "post") return;
    for (const name of ["likes", "reposts", "replies"]) {
      const span = node.querySelector(`.count.${name}`);
      const n = Number.isFinite(doc[name]) ? doc[name] : 0;
      span.textContent = String(n);
      span.dataset.n = String(n);
    }
  }

  function fields(payload) {
    return Object.entries(payload || {})
      .filter(([name, value]) => name !== "seq" && name !== "ts" && typeof value === "number")
      .map(([name, value]) => `${name} ${value}`).join(", ");
  }

  function reading(env, device) {
    const anomaly = (env.verdicts || []).find((v) => v && v.flagged);
    let row = devices.querySelector(`tr[data-device="${CSS.escape(device)}"]`);
    if (!row) {
      row = el("tr", {dataset: {device}}, el("td", {text: device}), el("td", {class: "values"}),
        el("td", {class: "when"}), el("td", {class: "state"}));
      prepend(devices, row, MAX_DEVICES);
    }
    row.querySelector(".values").textContent = fields(env.payload);
    row.querySelector(".when").replaceChildren(time(env.ts));
    row.querySelector(".state").textContent = anomaly ? "anomalous" : "normal";
    row.classList.toggle("anomalous", Boolean(anomaly));
    // An anomaly episode's start and end (not every flagged reading) go into the timeline.
    const episode = (env.verdicts || []).map((v) => v && v.detail && v.detail.episode).find(Boolean);
    if (episode && !items.has(env.id)) {
      const words = episode === "start" ? "anomaly started" : "back to normal";
      add(env.id, el("article", {class: `alert ${episode}`, dataset: {kind: "alert", device}},
        el("header", {}, el("span", {class: "author", text: device}), " ", time(env.ts),
          el("span", {class: "badge", text: words})),
        el("p", {class: "text", text: fields(env.payload)})));
    }
  }

  // The gateway tells the author about a blocked post twice: the notice (the verdict) on feeds/{me}/notices and
  // the post itself on quarantine/{me}. Whichever comes first makes the entry; the other completes it.
  function blocked(id, doc, text) {
    if (typeof id !== "string") return;
    let node = items.get(id);
    if (!node) {
      node = el("article", {class: "blocked", dataset: {kind: "blocked"}},
        el("header", {}, el("span", {class: "author", text: "Your post was not delivered"}), " ",
          doc.ts ? time(doc.ts) : null, el("span", {class: "badge", text: "blocked by the content policy"})),
        el("p", {class: "text"}));
      add(id, node);
    }
    if (text !== undefined) node.querySelector(".text").textContent = text;
  }

  function onMessage(topic, payload) {
    const doc = parse(payload);
    if (!doc) return;
    const parts = topic.split("/");
    if (parts[0] === "events" && parts[2] === "stats") {
      stats(parts[1], doc);
    } else if (parts[0] === "quarantine") {
      blocked(doc.id, doc, String((doc.payload || {}).text || ""));
    } else if (parts[0] === "feeds" && parts[2] === "notices") {
      if (doc.notice === "post_blocked") blocked(doc.event_id, doc);
    } else if (parts[0] === "feeds" && parts.length === 5 && typeof doc.id === "string") {
      // feeds/{me}/{users|devices}/{id}/{kind}; a repost brings a post already shown: once is enough.
      const [, , sourceKind, sourceId, kind] = parts;
      if (sourceKind === "users" && kind === "post" && !items.has(doc.id)) post(doc, sourceId);
      else if (sourceKind === "devices" && kind === "telemetry") reading(doc, sourceId);
    }
  }

  function subscribe(c) {
    const stats = [...items.values()].filter((n) => n.dataset.kind === "post").map((n) => statsTopic(n.dataset.id));
    return View.subscribeAll(c, [`feeds/${me}/#`, `quarantine/${me}`, ...stats]);
  }

  function compose(event) {
    event.preventDefault();
    const form = event.target;
    const text = form.elements.text.value;
    if (!text.trim()) return;
    // A nonce makes a post sent twice (a retry after a lost acknowledgement) one post.
    const nonce = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    publish(client, `users/${me}/posts`, {text, nonce}, (err) => {
      if (err) status(`not posted: ${err.message}`);
      else {
        form.elements.text.value = "";
        status("Posted: your followers see it now.");
      }
    });
  }

  function follow(event) {
    event.preventDefault();
    const form = event.target;
    const action = event.submitter && event.submitter.value === "unfollow" ? "unfollow" : "follow";
    const source = form.elements.source.value.trim();
    if (!source) return;
    publish(client, `users/${me}/follows`, {[action]: source}, (err) => {
      status(err ? `not sent: ${err.message}` : `${action === "follow" ? "Following" : "Unfollowed"} ${source}.`);
    });
  }

  View.login(({url, username, password}) => {
    me = username;
    document.getElementById("compose").addEventListener("submit", compose);
    document.getElementById("follow").addEventListener("submit", follow);
    document.getElementById("actions").hidden = false;
    client = View.connect({url, username, password, subscribe, onMessage});
    return {client};
  });
})();
