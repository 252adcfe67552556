// What the timeline and the operator page share: the login form, the connection to the broker, DOM helpers.
//
// The page talks to the broker itself, over MQTT over WebSockets, with the account of the person in front of it:
// the broker's ACL (deploy/mosquitto.acl) decides what that account may read and publish, not this code. Every
// text that arrives over MQTT is put into the page with textContent, never parsed as HTML.
"use strict";

const View = (() => {
  const params = new URLSearchParams(location.search);

  // deploy/mosquitto-websockets.conf listens on 8084; ?broker=wss://host:port/ names another port or path. Only on
  // this page's own host: a link must not be able to send the password typed here to someone else's server (the
  // field stays editable, in plain sight, for a user who means to).
  function defaultBroker() {
    const own = `wss://${location.hostname || "localhost"}:8084/`;
    const asked = params.get("broker");
    if (!asked) return own;
    try {
      const url = new URL(asked);
      return (url.protocol === "wss:" || url.protocol === "ws:") && url.hostname === location.hostname ? asked : own;
    } catch (e) {
      return own;
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function time(ms) {
    const date = new Date(ms);
    return el("time", {datetime: date.toISOString(), text: date.toLocaleTimeString()});
  }

  function parse(payload) {
    try {
      const doc = JSON.parse(new TextDecoder().decode(payload));
      return doc !== null && typeof doc === "object" ? doc : null;
    } catch (err) {
      return null;
    }
  }

  // A list that keeps its newest `max` entries on top: the page runs for days, memory must not grow with it.
  function prepend(list, node, max, onDrop) {
    list.prepend(node);
    while (list.children.length > max) {
      const gone = list.lastElementChild;
      gone.remove();
      if (onDrop) onDrop(gone);
    }
  }

  // Page states, on <body data-state>: login, connecting, live (subscribed), reconnecting, refused, replaced.
  function setState(state, detail) {
    document.body.dataset.state = state;
    const line = document.getElementById("connection");
    const words = {
      login: "not connected", connecting: "connecting…", live: "live", reconnecting: "connection lost, retrying…",
      refused: "the broker refused the login",
      replaced: "this account connected elsewhere (another page or app); this page stopped: reload to take it back",
      offline: "disconnected",
    };
    line.textContent = (words[state] || state) + (detail ? `: ${detail}` : "");
  }

  // Codes after which retrying with the same password cannot help: bad username or password, not authorised
  // (MQTT 3.1.1 CONNACK 4 and 5, MQTT 5 0x86 and 0x87).
  const REFUSED = new Set([4, 5, 0x86, 0x87]);
  const SESSION_TAKEN_OVER = 0x8e;
  // mosquitto makes the username the client id (use_username_as_clientid): one connection per account, and a
  // second one closes the first. mosquitto 2.0.11 just closes it, without saying why (no DISCONNECT 0x8E), so two
  // pages of one account would take the connection from each other every reconnect period, forever. A page whose
  // connection is closed this soon after it was made, this many times in a row, stops and says so: the older page
  // is always the first to reach the count, so the newest page (or the account's app) keeps the connection.
  const SHORT_LIVED_MS = 5000;
  const SHORT_LIVED_MAX = 3;

  // Connects with the account from the login form and calls `subscribe(client)` after every (re)connection: the
  // session is clean, so subscriptions are made again each time.
  function connect({url, username, password, subscribe, onMessage}) {
    setState("connecting");
    const client = mqtt.connect(url, {
      username, password, protocolVersion: 5, clean: true, resubscribe: false,
      clientId: `web-${username}-${Math.random().toString(16).slice(2, 10)}`,
      reconnectPeriod: 2000, connectTimeout: 10000,
    });
    let connectedAt = null;
    let shortLived = 0;
    const replaced = () => {
      client.end(true);
      setState("replaced");
    };
    client.on("connect", () => {
      connectedAt = Date.now();
      subscribe(client).then(() => setState("live"), (err) => setState("refused", err.message));
    });
    client.on("message", (topic, payload) => onMessage(topic, payload));
    client.on("reconnect", () => setState("reconnecting"));
    client.on("close", () => {
      if (connectedAt !== null) {
        shortLived = Date.now() - connectedAt < SHORT_LIVED_MS ? shortLived + 1 : 0;
        connectedAt = null;
        if (shortLived >= SHORT_LIVED_MAX) replaced();
      }
      if (document.body.dataset.state === "live") setState("reconnecting");
    });
    client.on("disconnect", (packet) => {
      if (packet && packet.reasonCode === SESSION_TAKEN_OVER) replaced();  // brokers that say why
    });
    client.on("error", (err) => {
      if (REFUSED.has(err.code)) {
        client.end(true);
        setState("refused", err.message);
      }
    });
    return client;
  }

  function subscribeAll(client, topics) {
    return new Promise((resolve, reject) => {
      client.subscribe(topics, {qos: 1}, (err, granted) => {
        const refused = (granted || []).filter((g) => g.qos >= 0x80).map((g) => g.topic);
        if (err) reject(err);
        else if (refused.length) reject(new Error(`not allowed to read ${refused.join(", ")}`));
        else resolve();
      });
    });
  }

  // Publishes at QoS 1; `done(error)` once the broker acknowledged (or refused) it.
  function publish(client, topic, doc, done) {
    client.publish(topic, JSON.stringify(doc), {qos: 1}, (err, packet) => {
      const code = packet && packet.reasonCode;
      done(err || (code >= 0x80 ? new Error(`refused by the broker (0x${code.toString(16)})`) : null));
    });
  }

  // Wires the login form: `start({url, username, password})` runs on submit; the password is not kept.
  function login(start) {
    const form = document.getElementById("login");
    form.elements.broker.value = defaultBroker();
    if (params.get("user")) form.elements.username.value = params.get("user");
    setState("login");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const url = form.elements.broker.value.trim();
      const username = form.elements.username.value.trim();
      const password = form.elements.password.value;
      form.elements.password.value = "";
      form.hidden = true;
      document.getElementById("who").textContent = username;
      window.view = start({url, username, password});
    });
  }

  return {el, time, parse, prepend, connect, subscribeAll, publish, login};
})();
