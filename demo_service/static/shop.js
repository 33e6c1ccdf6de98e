// The shop's pages: a little JavaScript, no build step, no framework.
//
// Security: the bearer token of POST /auth/login lives in localStorage and is sent as
// "Authorization: Bearer" by fetch(); the shop sets no cookie, so no other site can make a
// browser send a credential (no CSRF); the one exception is the admin's HttpOnly cookie
// for the read-only dashboard at /ymguard/ (see openDashboardSession). Text is written with
// textContent only; data comes from data-* attributes the server escaped. See demo_service/pages.py.
"use strict";

(function () {
  const TOKEN_KEY = "ymshop.token";

  // -- the token and the API ----------------------------------------------------------

  function token() {
    try {
      return localStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null;
    }
  }

  function claims() {
    const t = token();
    if (!t) return null;
    try {
      const part = t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const c = JSON.parse(atob(part));
      if (typeof c.exp === "number" && c.exp * 1000 < Date.now()) return null;
      return c;
    } catch (e) {
      return null;
    }
  }

  // The guards' dashboard (/ymguard/) is a page the browser opens itself, so it cannot be
  // sent the bearer header: after the admin logs in, the server sets a cookie of its own
  // (POST /auth/dashboard-session: HttpOnly, SameSite=Strict, Path=/ymguard) holding a
  // token good for the dashboard only. Nobody else gets a cookie; "Log out" deletes it.
  async function openDashboardSession(c) {
    if (c && c.adm === true) {
      try {  // not api(): that omits credentials, and a cookie set then is dropped
        await fetch("/auth/dashboard-session", {
          method: "POST", credentials: "same-origin", cache: "no-store",
          headers: { "Authorization": "Bearer " + token(), "Accept": "application/json" },
        });
      } catch (e) { /* the shop works without the dashboard */ }
    }
  }

  function signOut() {
    try {
      localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* private mode */ }
    fetch("/auth/dashboard-session", { method: "DELETE", credentials: "same-origin" })
      .catch(function () { /* offline: the cookie expires by itself */ });
  }

  // A path of this site to return to, or "/": never another origin.
  // Parsed as the browser will parse it (which drops tabs and newlines, and reads "\\" as
  // "/"), then kept only if it stays on this origin.
  function safeNext(raw) {
    if (typeof raw !== "string" || !raw.startsWith("/")) return "/";
    try {
      const url = new URL(raw, location.origin);
      if (url.origin !== location.origin) return "/";
      return url.pathname + url.search + url.hash;
    } catch (e) {
      return "/";
    }
  }

  function toLogin() {
    signOut();
    const here = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(here));
  }

  class Problem extends Error {
    constructor(status, code, detail, retryAfter) {
      super(detail || code || ("HTTP " + status));
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // fetch() a JSON route of the API; answers its JSON or throws a Problem.
  async function api(method, path, options) {
    const opts = options || {};
    const headers = Object.assign({ "Accept": "application/json" }, opts.headers || {});
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    let body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let response;
    try {
      response = await fetch(path, { method: method, headers: headers, body: body,
                                     credentials: "omit", cache: "no-store" });
    } catch (e) {
      throw new Problem(0, "network", "");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (response.ok) return data;
    const type = data && typeof data.type === "string" ? data.type : "";
    const code = type.replace(/\/+$/, "").split("/").pop() || "";
    const problem = new Problem(response.status, code, data && data.detail,
                                response.headers.get("Retry-After"));
    if (response.status === 401 && code !== "bad-credentials" && !opts.noRedirect) {
      toLogin();
    }
    throw problem;
  }

  // What a person reads for a refusal: the guards' 429/503 and the shop's 409s.
  const MESSAGES = {
    "network": "Could not reach the shop. Check your connection and try again.",
    "sold-out": "Sold out: every unit of this course is taken.",
    "already-purchased": "You already bought this course (one per person).",
    "activity-not-ongoing": "The sale is not open right now.",
    "duplicate-submission": "This order was already submitted. Look at your orders before trying again.",
    "bad-credentials": "Wrong username or password.",
    "username-taken": "That username is taken. Pick another one.",
    "validation-error": "Please check what you typed: usernames use letters, digits and . _ @ -",
    "not-found": "We could not find that.",
    "unauthorized": "Please log in first.",
    "invalid-request": "That cannot be done now.",
    "idempotency-key-in-flight": "Your payment is already being prepared. One moment.",
  };
  const BUSY = "So many people are buying right now that the shop asked you to wait. Please try again in a moment.";
  const DOWN = "The shop is having a hiccup. Please try again in a few seconds.";

  function human(problem) {
    if (problem && MESSAGES[problem.code]) return MESSAGES[problem.code];
    const status = problem ? problem.status : 0;
    if (status === 429) return BUSY;
    if (status === 503) return DOWN;
    if (status === 409) return "That cannot be done now: " + (problem.message || "conflict") + ".";
    return "Something went wrong. Please try again.";
  }

  // -- small DOM helpers --------------------------------------------------------------

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  function say(el, text, kind) {
    if (!el) return;
    el.textContent = text;
    el.hidden = !text;
    el.classList.toggle("error", kind === "error");
    el.classList.toggle("ok", kind === "ok");
  }

  function link(href, text, cls) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    a.className = cls || "button";
    return a;
  }

  function localTimes() {
    document.querySelectorAll("time[data-local-time]").forEach(function (el) {
      const d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) {
        el.textContent = d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
      }
    });
  }

  function header() {
    const c = claims();
    const who = $("[data-who]");
    const login = $("[data-login-link]");
    const logout = $("[data-logout]");
    if (c && who) {
      who.textContent = String(c.name || "");
      who.hidden = false;
      if (login) login.hidden = true;
      if (logout) logout.hidden = false;
    }
    if (logout) {
      logout.addEventListener("click", function () {
        signOut();
        location.assign("/");
      });
    }
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  // The kill orders this browser got, per user and kill course ("go to order" after reload).
  function killOrderKey(killCourseId) {
    const c = claims();
    return "ymshop.kill." + (c ? c.sub : "?") + "." + killCourseId;
  }

  function rememberKill(killCourseId, killOrderNo, courseName) {
    try {
      localStorage.setItem(killOrderKey(killCourseId), killOrderNo);
      localStorage.setItem("ymshop.name." + killOrderNo, courseName);
    } catch (e) { /* private mode: the link still shows now */ }
  }

  function rememberedKill(killCourseId) {
    try {
      return localStorage.getItem(killOrderKey(killCourseId));
    } catch (e) {
      return null;
    }
  }

  // The order placed from a kill order in this browser (to find it again after "back").
  function rememberOrder(killOrderNo, orderNo) {
    try {
      localStorage.setItem("ymshop.order." + killOrderNo, orderNo);
    } catch (e) { /* private mode */ }
  }

  function rememberedOrder(killOrderNo) {
    try {
      const value = localStorage.getItem("ymshop.order." + killOrderNo);
      return value && /^O[0-9a-f]+$/.test(value) ? value : null;
    } catch (e) {
      return null;
    }
  }

  // -- the seckill page ---------------------------------------------------------------

  function activityPage(main) {
    const id = main.dataset.activityId;
    const start = Date.parse(main.dataset.start);
    const end = Date.parse(main.dataset.end);
    // The server's clock minus ours: the countdown runs on the server's time.
    let offset = Date.parse(main.dataset.serverTime) - Date.now();
    const countdown = $("[data-countdown]");
    const cards = Array.from(document.querySelectorAll("[data-course]"));
    const state = new Map();
    cards.forEach(function (card) {
      state.set(card, { stock: Number(card.dataset.stock), busy: false,
                        done: rememberedKill(card.dataset.killCourseId) });
      card.querySelector("[data-buy]").addEventListener("click", function () { buy(card); });
    });

    function now() {
      return Date.now() + offset;
    }

    function two(n) {
      return String(n).padStart(2, "0");
    }

    function left(ms) {
      const s = Math.max(0, Math.ceil(ms / 1000));
      const d = Math.floor(s / 86400);
      const hms = two(Math.floor(s / 3600) % 24) + ":" + two(Math.floor(s / 60) % 60) + ":" + two(s % 60);
      return d > 0 ? d + "d " + hms : hms;
    }

    function showStock(card) {
      const s = state.get(card);
      const span = card.querySelector("[data-stock-left]");
      if (span) span.textContent = String(s.stock);
      const meter = card.querySelector("[data-meter]");
      if (meter) {
        const total = Number(meter.dataset.total) || 1;
        meter.style.width = Math.max(0, Math.min(100, (100 * s.stock) / total)) + "%";
      }
    }

    function goToOrder(card, killOrderNo) {
      const action = card.querySelector("[data-action]");
      action.replaceChildren(link("/orders/" + encodeURIComponent(killOrderNo) + "/confirm",
                                  "Go to order", "button go"));
    }

    function render() {
      const t = now();
      let phase;
      if (t < start) {
        phase = "not_started";
        countdown.textContent = "Starts in " + left(start - t);
      } else if (t < end) {
        phase = "ongoing";
        countdown.textContent = "On now · ends in " + left(end - t);
      } else {
        phase = "ended";
        countdown.textContent = "This sale has ended";
      }
      main.dataset.phase = phase;
      cards.forEach(function (card) {
        const s = state.get(card);
        showStock(card);
        if (s.done) {
          if (!card.querySelector("a.go")) goToOrder(card, s.done);
          return;
        }
        const button = card.querySelector("[data-buy]");
        if (!button || s.busy) return;
        if (s.stock <= 0) {
          button.textContent = "Sold out";
          button.disabled = true;
        } else if (phase === "not_started") {
          button.textContent = "Not started";
          button.disabled = true;
        } else if (phase === "ended") {
          button.textContent = "Ended";
          button.disabled = true;
        } else {
          button.textContent = "Buy now";
          button.disabled = false;
        }
      });
    }

    async function buy(card) {
      const s = state.get(card);
      if (s.busy || s.done) return;
      if (!claims()) {
        toLogin();
        return;
      }
      const button = card.querySelector("[data-buy]");
      const message = card.querySelector("[data-message]");
      s.busy = true;
      button.disabled = true;
      button.textContent = "One moment…";
      say(message, "");
      try {
        const answer = await api("POST", "/kill/" + encodeURIComponent(card.dataset.killCourseId));
        s.done = answer.kill_order_no;
        rememberKill(card.dataset.killCourseId, s.done, card.dataset.courseName);
        s.stock = Math.max(0, s.stock - 1);
        say(message, "You got it! Confirm your order to pay.", "ok");
      } catch (problem) {
        if (problem.code === "sold-out") s.stock = 0;
        say(message, human(problem), "error");
        if (problem.code === "activity-not-ongoing") refresh();
      } finally {
        s.busy = false;
        render();
      }
    }

    // Resync the clock (half the round trip) and the stock from the JSON API.
    async function refresh() {
      const sent = Date.now();
      try {
        const a = await api("GET", "/activities/" + encodeURIComponent(id), { noRedirect: true });
        const received = Date.now();
        offset = Date.parse(a.server_time) - (sent + received) / 2;
        a.courses.forEach(function (c) {
          const card = cards.find(function (x) { return x.dataset.killCourseId === String(c.kill_course_id); });
          if (card) state.get(card).stock = c.stock_left;
        });
      } catch (e) {
        /* keep the last known clock and stock; the next refresh tries again */
      }
      render();
    }

    render();
    setInterval(render, 250);
    refresh();
    (async function poll() {
      for (;;) {
        const ongoing = main.dataset.phase === "ongoing";
        const soon = main.dataset.phase === "not_started" && start - now() < 60000;
        await sleep(ongoing || soon ? 3000 : 15000);
        if (main.dataset.phase !== "ended") await refresh();
      }
    })();
  }

  // -- log in / register --------------------------------------------------------------

  function loginPage() {
    const next = safeNext(new URLSearchParams(location.search).get("next"));
    if (claims()) {
      say($("[data-notice]"), "You are logged in. Log in again to switch accounts.");
    }

    async function logIn(username, password) {
      const answer = await api("POST", "/auth/login", { json: { username: username, password: password } });
      localStorage.setItem(TOKEN_KEY, answer.token);
      await openDashboardSession(claims());
      location.assign(next);
    }

    function wire(form, register) {
      const message = form.querySelector("[data-message]");
      const button = form.querySelector("button[type=submit]");
      form.addEventListener("submit", async function (event) {
        event.preventDefault();
        if (button.disabled) return;
        button.disabled = true;
        say(message, "");
        const username = form.elements.username.value.trim();
        const password = form.elements.password.value;
        try {
          if (register) {
            await api("POST", "/auth/register", { json: { username: username, password: password } });
          }
          await logIn(username, password);
        } catch (problem) {
          say(message, human(problem), "error");
          button.disabled = false;
        }
      });
    }
    wire($("[data-login-form]"), false);
    wire($("[data-register-form]"), true);
  }

  // -- confirm: submit token, pay type, place the order, go to the cashier -------------

  function safePayUrl(raw) {
    try {
      const url = new URL(raw, location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  async function payOrder(orderNo, message) {
    const answer = await api("POST", "/pay/" + encodeURIComponent(orderNo),
                             { headers: { "Idempotency-Key": randomKey() } });
    const url = safePayUrl(answer.pay_url);
    if (!url) throw new Problem(502, "bad-pay-url", "");
    say(message, "Taking you to the cashier…", "ok");
    location.assign(url);
  }

  function confirmPage(main) {
    if (!claims()) {
      toLogin();
      return;
    }
    const killOrderNo = main.dataset.orderNo;
    const form = $("[data-confirm-form]");
    const button = $("[data-confirm]");
    const message = form.querySelector("[data-message]");
    const status = $("[data-kill-status]");
    let submitToken = null;
    let submitted = false;
    let closed = false;  // the kill order cannot be ordered (any more)
    try {
      $("[data-course-name]").textContent = localStorage.getItem("ymshop.name." + killOrderNo) || "";
    } catch (e) { /* nothing remembered */ }

    const STATUS = { PENDING: "being recorded", CREATED: "reserved for you",
                     ORDERED: "already ordered", EXPIRED: "expired", CANCELLED: "cancelled" };
    api("GET", "/kill/orders/" + encodeURIComponent(killOrderNo)).then(function (k) {
      status.textContent = STATUS[k.status] || k.status;
      if (k.status === "EXPIRED" || k.status === "CANCELLED") {
        close("This seckill order is " + STATUS[k.status] + ": its unit went back on sale.");
      } else if (k.status === "ORDERED" && !submitted) {
        const placed = rememberedOrder(killOrderNo);
        close(placed ? "You already placed this order." : "This seckill order already has an order.");
        if (placed) {
          form.append(link("/orders/" + encodeURIComponent(placed), "Go to your order", "button go"));
        }
      }
    }).catch(function (problem) {
      status.textContent = "unknown";
      if (problem.status === 404) close("We could not find this seckill order.");
    });

    function close(text) {
      closed = true;
      button.disabled = true;
      button.textContent = "Not available";
      say(message, text, "error");
    }

    async function fetchToken() {
      button.disabled = true;
      button.textContent = "Preparing…";
      try {
        const answer = await api("GET", "/orders/submit-token?kill_order_no=" + encodeURIComponent(killOrderNo));
        submitToken = answer.token;
        if (!submitted && !closed) {
          button.textContent = "Confirm and pay";
          button.disabled = false;
        }
      } catch (problem) {
        say(message, human(problem), "error");
        button.textContent = "Try again";
        button.disabled = false;
      }
    }

    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      // One order per confirm: the first click wins, later clicks do nothing (and the
      // submit token, spent once by the server, refuses any second POST anyway).
      if (submitted || closed) return;
      if (!submitToken) {
        await fetchToken();
        return;
      }
      submitted = true;
      button.disabled = true;
      button.textContent = "Placing your order…";
      say(message, "");
      let orderNo = null;
      try {
        const payType = form.elements.pay_type.value;
        const order = await api("POST", "/orders", {
          headers: { "X-Submit-Token": submitToken },
          json: { kill_order_no: killOrderNo, pay_type: payType },
        });
        orderNo = order.order_no;
        rememberOrder(killOrderNo, orderNo);
        await payOrder(orderNo, message);
      } catch (problem) {
        if (orderNo) {
          // The order exists: its page pays it (and follows it).
          location.assign("/orders/" + encodeURIComponent(orderNo));
          return;
        }
        say(message, human(problem), "error");
        if (problem.status === 429 || problem.status === 503 || problem.code === "network") {
          // Nothing was placed: a fresh token, and the person may try again.
          submitted = false;
          submitToken = null;
          fetchToken();
        } else {
          button.textContent = "Not placed";
        }
      }
    });
    fetchToken();
  }

  // -- an order: follow it until PAID or cancelled --------------------------------------

  function orderPage(main) {
    if (!claims()) {
      toLogin();
      return;
    }
    const orderNo = main.dataset.orderNo;
    const statusEl = $("[data-status]");
    const action = $("[data-action]");
    const message = $("[data-message]");
    const WORDS = {
      TO_PAY: "Waiting for your payment",
      PAID: "Paid. The course is yours!",
      TIMEOUT_CANCEL: "Cancelled: it was not paid in time",
      REFUNDED: "Refunded",
    };
    const FINAL = new Set(["PAID", "TIMEOUT_CANCEL", "REFUNDED"]);
    let paying = false;

    function show(o) {
      statusEl.textContent = WORDS[o.status] || o.status;
      main.dataset.orderStatus = o.status;
      statusEl.className = "status big status-" + o.status.toLowerCase();
      $("[data-amount]").textContent = "¥" + o.amount;
      const PAY = { TO_PAY: "waiting", PAID: "received", REFUNDED: "refunded", CLOSED: "closed" };
      $("[data-pay-status]").textContent = PAY[o.pay_status] || o.pay_status || "not started";
      const expires = new Date(o.expires_at);
      $("[data-expires]").textContent = o.status === "TO_PAY" && !isNaN(expires)
        ? expires.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "–";
      if (o.status === "TO_PAY" && !action.querySelector("button")) {
        const pay = document.createElement("button");
        pay.type = "button";
        pay.className = "button";
        pay.textContent = "Pay now";
        pay.addEventListener("click", async function () {
          if (paying) return;
          paying = true;
          pay.disabled = true;
          try {
            await payOrder(orderNo, message);
          } catch (problem) {
            say(message, human(problem), "error");
            paying = false;
            pay.disabled = false;
          }
        });
        action.replaceChildren(pay);
      } else if (o.status === "PAID") {
        action.replaceChildren(link("/me/courses", "Go to my courses"));
      } else if (FINAL.has(o.status)) {
        action.replaceChildren(link("/", "Back to the flash sales", "button secondary"));
      }
    }

    // After the cashier, the payment's notify arrives a moment later: follow the order.
    (async function follow() {
      let delay = 1000;
      for (;;) {
        try {
          const o = await api("GET", "/orders/" + encodeURIComponent(orderNo));
          show(o);
          say(message, "");
          if (FINAL.has(o.status)) return;
        } catch (problem) {
          if (problem.status === 404) {
            statusEl.textContent = "No such order";
            return;
          }
          say(message, human(problem), "error");
        }
        await sleep(delay);
        delay = Math.min(5000, delay + 500);
      }
    })();
  }

  // -- my courses ------------------------------------------------------------------------

  async function coursesPage() {
    if (!claims()) {
      toLogin();
      return;
    }
    const list = $("[data-courses]");
    try {
      const answer = await api("GET", "/me/courses");
      $("[data-empty]").hidden = answer.courses.length > 0;
      answer.courses.forEach(function (c) {
        const li = document.createElement("li");
        li.className = "card owned";
        const h = document.createElement("h2");
        h.textContent = c.name;
        const p = document.createElement("p");
        p.className = "muted";
        p.append("Bought with order ");
        p.append(link("/orders/" + encodeURIComponent(c.order_no), c.order_no, "plain"));
        li.append(h, p);
        list.append(li);
      });
    } catch (problem) {
      say($("[data-message]"), human(problem), "error");
    }
  }

  // -- start -------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", function () {
    header();
    localTimes();
    const main = document.querySelector("main[data-page]");
    const kind = main ? main.dataset.page : "";
    if (kind === "activity") activityPage(main);
    else if (kind === "login") loginPage();
    else if (kind === "confirm") confirmPage(main);
    else if (kind === "order") orderPage(main);
    else if (kind === "courses") coursesPage();
  });
})();
