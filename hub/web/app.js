// The hall dashboard in the browser: plain JavaScript, no build step, nothing loaded from
// elsewhere. Data comes from /dashboard/api/* (JSON) and live changes from the server-sent
// event stream /dashboard/api/stream. Every value from the hub is put into the page as text
// (never as HTML), so a staff or item name can never become markup.
"use strict";

(function () {
  const STAR_LABELS = { 5: "非常满意", 4: "满意", 3: "基本满意", 2: "不满意", 1: "非常不满意" };
  const STATE_LABELS = { online: "在线", degraded: "异常", offline: "离线", never: "未上线" };
  const EVENT_LABELS = {
    birth: "连接上线", will: "断开（遗嘱消息）", state: "状态变化", boot: "启动",
    gap: "序号缺口", seq_reset: "序号回退", bad_prompt: "无法解析评价请求", ota: "固件更新",
  };
  const ROLLOUT_LABELS = { running: "进行中", paused: "已暂停", halted: "已中止", cancelled: "已取消", done: "已完成" };
  const STAGE_LABELS = { canary: "试点设备", rest: "其余设备" };
  const UPDATE_LABELS = {
    pending: "等待", offered: "已推送", downloading: "下载中", installing: "安装中", done: "已更新",
    skipped: "已是该版本", failed: "失败", withdrawn: "已撤回",
  };
  const UPDATE_ORDER = ["done", "skipped", "failed", "installing", "downloading", "offered", "pending", "withdrawn"];
  const WHY_LABELS = {
    hash: "校验值不符", size: "大小不符", image: "镜像无法挂载", flash: "闪存写入失败",
    "rolled back": "启动失败，已回滚", "no confirmation in 10 min": "10 分钟内未确认",
    halted: "更新中止，已撤回", cancelled: "更新取消，已撤回", retired: "设备已停用",
    "already running": "已在运行该版本",
  };
  const FEED_MAX = 100;
  const GOOD = "#1f8f4e", BAD = "#d23b2f", UNRATED = "#b8c0ca";

  const state = {
    me: null, overview: null, alerts: new Map(), feed: [], stream: null, chartDay: "",
    timers: {}, route: "",
  };

  // ---- small helpers ---------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
      else if (k === "style") el.style.cssText = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function offsetMs() { return ((state.me && state.me.utc_offset_hours) || 8) * 3600 * 1000; }
  function localIso(ms) { return new Date(ms + offsetMs()).toISOString(); }
  function hms(t) { return localIso(t * 1000).slice(11, 19); }
  function hm(t) { return localIso(t * 1000).slice(11, 16); }
  function isoSeconds(text) { return text ? Date.parse(text) / 1000 : null; }
  function whenIso(text) {
    const t = isoSeconds(text);
    if (t === null) return "—";
    const today = localIso(Date.now()).slice(0, 10);
    const day = localIso(t * 1000).slice(0, 10);
    return (day === today ? "" : day.slice(5) + " ") + hms(t);
  }
  function pct(rate) { return rate === null || rate === undefined ? "—" : (rate * 100).toFixed(1) + "%"; }
  function stars(n) { return n > 0 ? "★".repeat(n) + "☆".repeat(5 - n) : "—"; }
  function windowName(w) { return w ? "窗口 " + w : "未分配窗口"; }

  function debounce(name, ms, fn) {
    clearTimeout(state.timers[name]);
    state.timers[name] = setTimeout(fn, ms);
  }

  function toast(text) {
    const el = $("toast");
    el.textContent = text;
    el.hidden = false;
    debounce("toast", 3000, () => { el.hidden = true; });
  }

  async function api(method, path, body) {
    const options = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const resp = await fetch("api/" + path, options);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (resp.status === 401 && path !== "login") {
      showLogin();
      throw new Error("未登录");
    }
    if (!resp.ok) throw new Error((data && data.error) || ("HTTP " + resp.status));
    return data;
  }

  // ---- login -----------------------------------------------------------------------------
  function showLogin() {
    closeStream();
    state.me = null;
    for (const id of ["hall-view", "devices-view", "updates-view", "device-view", "links", "logout"]) $(id).hidden = true;
    $("who").textContent = "";
    $("login-view").hidden = false;
    setLive(false, "未登录");
  }

  async function onLogin(ev) {
    ev.preventDefault();
    const form = ev.target;
    $("login-error").textContent = "";
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      state.me = await api("POST", "login", { name: form.name.value.trim(), password: form.password.value });
      form.password.value = "";
      await start();
    } catch (e) {
      $("login-error").textContent = e.message === "wrong name or password" ? "账号或密码错误" : e.message;
    } finally {
      button.disabled = false;
    }
  }

  async function onLogout() {
    try { await api("POST", "logout", {}); } catch (e) { /* already gone */ }
    showLogin();
  }

  // ---- start and routing -----------------------------------------------------------------
  async function start() {
    if (!state.me) state.me = await api("GET", "me");
    $("login-view").hidden = true;
    $("links").hidden = false;
    $("logout").hidden = false;
    $("who").textContent = state.me.display_name || state.me.name;
    $("hall-name").textContent = state.me.hall;
    openStream();
    await route();
  }

  async function route() {
    const hash = location.hash || "#/";
    state.route = hash;
    $("hall-view").hidden = true;
    $("devices-view").hidden = true;
    $("updates-view").hidden = true;
    $("device-view").hidden = true;
    if (!state.me) return;
    if (hash.startsWith("#/device/")) {
      $("device-view").hidden = false;
      await loadDevice(decodeURIComponent(hash.slice(9)));
    } else if (hash === "#/updates") {
      $("updates-view").hidden = false;
      await loadUpdates();
    } else if (hash === "#/devices") {
      $("devices-view").hidden = false;
      await Promise.all([loadDevices(), loadSystem()]);
    } else {
      $("hall-view").hidden = false;
      await Promise.all([loadOverview(), loadAlerts(), loadFeed(), loadCharts()]);
    }
  }

  // ---- the live stream -------------------------------------------------------------------
  function setLive(on, text) {
    const el = $("live");
    el.className = "live " + (on ? "on" : "off");
    el.textContent = text;
  }

  function closeStream() {
    if (state.stream) state.stream.close();
    state.stream = null;
  }

  function openStream() {
    closeStream();
    const es = new EventSource("api/stream");
    state.stream = es;
    let everOpen = false;
    es.addEventListener("hello", () => {
      setLive(true, "实时");
      // After a drop, what changed meanwhile is fetched again rather than guessed.
      if (everOpen) refreshAll();
      everOpen = true;
    });
    es.addEventListener("vote", (ev) => onVote(JSON.parse(ev.data)));
    es.addEventListener("alert", (ev) => onAlert(JSON.parse(ev.data)));
    es.addEventListener("device", (ev) => onDevice(JSON.parse(ev.data)));
    es.addEventListener("windows", () => debounce("overview", 300, loadOverview));
    es.addEventListener("resync", () => refreshAll());
    es.addEventListener("logout", () => showLogin());
    es.onerror = () => {
      setLive(false, "连接中断，重连中…");
      // A stream refused for a lapsed login never recovers by itself: ask who we are.
      debounce("whoami", 3000, () => api("GET", "me").catch(() => {}));
      // The browser retries a dropped stream by itself, but gives up on an error answer
      // (a proxy's 502 while the hub restarts): then open a new one.
      if (es.readyState === EventSource.CLOSED) {
        debounce("reopen", 5000, () => { if (state.me && state.stream === es) openStream(); });
      }
    };
  }

  function refreshAll() {
    if (!state.me) return;
    debounce("refresh", 200, route);
  }

  function onVote(vote) {
    state.feed.unshift(vote);
    state.feed.length = Math.min(state.feed.length, FEED_MAX);
    if (!$("hall-view").hidden) {
      const list = $("feed");
      const empty = list.querySelector(".empty");
      if (empty) empty.remove();
      list.insertBefore(feedRow(vote, true), list.firstChild);
      while (list.children.length > FEED_MAX) list.lastChild.remove();
      debounce("overview", 400, loadOverview);
      debounce("charts", 3000, loadCharts);
    }
  }

  function onAlert(alert) {
    state.alerts.set(alert.id, alert);
    renderAlerts();
    if (alert.open && alert.kind === "bad_rating") toast("新差评：" + windowName(alert.window));
    debounce("overview", 400, loadOverview);
  }

  function onDevice(change) {
    if (!$("hall-view").hidden) debounce("overview", 200, loadOverview);
    if (!$("devices-view").hidden) debounce("devices", 200, () => Promise.all([loadDevices(), loadSystem()]));
    if (state.route === "#/device/" + encodeURIComponent(change.device_id)) {
      debounce("device", 200, () => loadDevice(change.device_id));
    }
  }

  // ---- overview: summary and windows -----------------------------------------------------
  async function loadOverview() {
    const data = await api("GET", "overview");
    state.overview = data;
    renderSummary(data);
    renderWindows(data);
  }

  function tile(value, label, cls) {
    return h("div", { class: "tile " + (cls || "") }, h("b", null, value), h("span", null, label));
  }

  function renderSummary(data) {
    const t = data.totals;
    const d = data.devices;
    const box = $("summary");
    box.replaceChildren(
      tile(t.votes, "今日评价"),
      tile(pct(t.rate), "好评率", t.rate !== null && t.rate < 0.9 ? "bad" : "good"),
      tile(t.bad, "差评", t.bad ? "bad" : ""),
      tile(t.open_alerts, "待处理", t.open_alerts ? "bad" : ""),
      tile((d.online || 0) + (d.degraded || 0) + "/" +
           ((d.online || 0) + (d.degraded || 0) + (d.offline || 0) + (d.never || 0)), "设备在线",
           d.offline ? "bad" : (d.degraded ? "warn" : "good")),
      tile(t.unrated, "未评价"),
      tile(data.province.unforwarded, "待上报省平台",
           data.province.chain_error || data.province.error ? "bad" : ""),
    );
  }

  function renderWindows(data) {
    const box = $("windows");
    if (!data.windows.length) {
      box.replaceChildren(h("div", { class: "empty" }, "本大厅还没有窗口或设备。"));
      return;
    }
    box.replaceChildren(...data.windows.map(windowCard));
  }

  function windowCard(w) {
    const st = w.state || "none";
    const today = w.today;
    const devices = w.devices.map((d) => h("div", { class: "line" },
      h("a", { href: "#/device/" + encodeURIComponent(d.device_id) }, "评价器 " + d.device_id), " ",
      h("span", { class: "pill " + d.state, "data-state": d.state }, STATE_LABELS[d.state] || d.state),
      d.state === "offline" && d.since ? " 自 " + whenIso(d.since) : "",
      d.reason_labels && d.reason_labels.length ? h("div", { class: "reasons" }, d.reason_labels.join("、")) : null));
    const last = w.last_vote;
    return h("article", { class: "window state-" + st, "data-window": w.window, "data-state": st },
      h("header", null, h("b", null, windowName(w.window)),
        h("span", { class: "pill " + st }, STATE_LABELS[st] || "无设备")),
      w.staff_no
        ? h("div", { class: "staff" }, w.staff_name || "", " ", h("span", { class: "line" }, "工号 " + w.staff_no))
        : h("div", { class: "staff none" }, "无人签到（暂停服务）"),
      h("div", { class: "line" }, "今日 ", h("b", null, today.votes), " 评 · 差评 ",
        h("b", null, today.bad), " · 好评率 ",
        h("span", { class: "rate" + (today.rate !== null && today.rate < 0.9 ? " low" : "") }, pct(today.rate))),
      h("div", { class: "line" }, "最近：",
        last ? (last.kind === "u" ? "未评价" : stars(last.stars) + " " + last.stars_label) + " " + hm(last.t) : "今日暂无"),
      devices.length ? devices : h("div", { class: "line" }, "未配置评价器"));
  }

  // ---- alerts ----------------------------------------------------------------------------
  async function loadAlerts() {
    const data = await api("GET", "alerts");
    state.alerts = new Map(data.alerts.map((a) => [a.id, a]));
    renderAlerts();
  }

  function renderAlerts() {
    const all = [...state.alerts.values()].sort((a, b) => b.id - a.id);
    const open = all.filter((a) => a.open);
    const done = all.filter((a) => !a.open);
    $("alerts-count").textContent = open.length ? String(open.length) : "";
    $("alerts-open").replaceChildren(...(open.length ? open.map(alertCard)
      : [h("div", { class: "empty" }, "没有待处理的差评或设备告警。")]));
    $("alerts-done").replaceChildren(...(done.length ? done.map(alertCard)
      : [h("div", { class: "empty" }, "今日暂无。")]));
  }

  function alertCard(a) {
    const d = a.detail || {};
    const body = [];
    if (a.kind === "bad_rating") {
      body.push(h("div", null, stars(d.stars), " ", d.stars_label || STAR_LABELS[d.stars] || ""));
      if (d.reasons && d.reasons.length) {
        body.push(h("div", { class: "reasons" }, d.reasons.map((r) => h("span", null, r.label || r.code))));
      }
      body.push(h("div", { class: "meta" },
        d.staff_no ? "工作人员 " + (d.staff_name || "") + "（工号 " + d.staff_no + "）" : "无人签到"));
      if (d.item) body.push(h("div", { class: "meta" }, "事项：" + d.item));
      if (d.case_no) body.push(h("div", { class: "meta" }, "办件编号：" + d.case_no));
    } else {
      body.push(h("div", null, "评价器 " + a.device_id,
        a.kind === "offline" ? (d.cause === "silent" ? " 没有心跳" : " 已断开") : "",
        a.kind === "recovered" ? " 已恢复" + (d.to === "online" ? "正常" : "连接") : ""));
      if (d.reason_labels && d.reason_labels.length) body.push(h("div", { class: "meta" }, d.reason_labels.join("、")));
    }
    const when = a.kind === "bad_rating" && d.t ? hms(d.t) : whenIso(a.at);
    const actions = h("div", { class: "actions" });
    if (a.acked_at) {
      actions.appendChild(h("span", { class: "acked", "data-acked-by": a.acked_by },
        "已由 " + a.acked_by + " 于 " + whenIso(a.acked_at) + " 确认"));
    } else if (a.resolved_at && a.kind !== "recovered") {
      actions.appendChild(h("span", { class: "acked" }, "已于 " + whenIso(a.resolved_at) + " 自动解除"));
    } else if (a.open) {
      actions.appendChild(h("button", { type: "button", class: "ack", onclick: () => ack(a.id) }, "确认已知晓"));
    }
    if (a.device_id && a.kind !== "bad_rating") {
      actions.appendChild(h("a", { href: "#/device/" + encodeURIComponent(a.device_id) }, "设备详情"));
    }
    return h("article", {
      class: "alert kind-" + a.kind + (a.open ? " open" : " closed"),
      "data-alert-id": a.id, "data-kind": a.kind, "data-open": a.open ? "1" : "0",
    }, h("div", { class: "head" }, h("span", null, a.kind_label + " · " + windowName(a.window)),
      h("span", { class: "meta" }, when)), body, actions);
  }

  async function ack(id) {
    try {
      const alert = await api("POST", "alerts/" + id + "/ack", {});
      state.alerts.set(alert.id, alert);
      renderAlerts();
      debounce("overview", 200, loadOverview);
    } catch (e) {
      toast("确认失败：" + e.message);
    }
  }

  // ---- live feed -------------------------------------------------------------------------
  async function loadFeed() {
    const data = await api("GET", "votes?limit=50");
    state.feed = data.votes;
    const list = $("feed");
    list.replaceChildren(...(data.votes.length ? data.votes.map((v) => feedRow(v, false))
      : [h("li", { class: "empty" }, "暂无评价。")]));
  }

  function feedRow(v, fresh) {
    const cls = (v.bad ? "bad" : v.good ? "good" : "unrated") + (fresh ? " fresh" : "");
    return h("li", { class: cls, "data-vote": v.id },
      h("span", { class: "t" }, hms(v.t)),
      windowName(v.window), " ",
      v.staff_name ? v.staff_name + " " : "",
      v.kind === "u" ? h("span", { class: "meta" }, "未评价（离开）")
        : [h("span", { class: "stars" }, stars(v.stars)), " ", v.stars_label],
      v.item ? h("div", { class: "line" }, v.item) : null,
      v.reasons && v.reasons.length ? h("div", { class: "why" }, "原因：" + v.reasons.map((r) => r.label).join("、")) : null);
  }

  // ---- charts ----------------------------------------------------------------------------
  async function loadCharts() {
    const day = state.chartDay;
    const data = await api("GET", "charts" + (day ? "?day=" + encodeURIComponent(day) : ""));
    if (!$("chart-day").value) $("chart-day").value = data.day;
    renderHours(data.hours);
    renderBars($("chart-windows"), data.windows, (r) => windowName(r.key));
    renderBars($("chart-staff"), data.staff, (r) => r.key ? (r.label !== r.key ? r.label + "（" + r.key + "）" : r.key) : "无人签到");
    renderBars($("chart-items"), data.items, (r) => r.label || "（无事项名）");
  }

  function renderHours(hours) {
    const W = 720, H = 200, left = 30, bottom = 22, top = 10;
    const max = Math.max(1, ...hours.map((x) => x.good + x.bad + x.unrated));
    const step = (W - left) / 24;
    const scale = (H - bottom - top) / max;
    const g = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "各时段评价数" });
    g.appendChild(svg("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" }));
    const ticks = max <= 5 ? max : 4;
    for (let i = 1; i <= ticks; i++) {
      const v = Math.round(max * i / ticks);
      const y = H - bottom - v * scale;
      g.appendChild(svg("line", { x1: left, y1: y, x2: W, y2: y, class: "axis", "stroke-dasharray": "2 3" }));
      g.appendChild(svg("text", { x: 2, y: y + 4 }, v));
    }
    hours.forEach((x, i) => {
      const bx = left + i * step + 2, bw = step - 4;
      let y = H - bottom;
      for (const [n, color] of [[x.good, GOOD], [x.bad, BAD], [x.unrated, UNRATED]]) {
        if (!n) continue;
        const hgt = n * scale;
        y -= hgt;
        const rect = svg("rect", { x: bx, y: y, width: bw, height: hgt, fill: color });
        rect.appendChild(svg("title", null, i + "时 好评 " + x.good + " 差评 " + x.bad + " 未评价 " + x.unrated));
        g.appendChild(rect);
      }
      if (i % 2 === 0) g.appendChild(svg("text", { x: bx + bw / 2, y: H - 6, "text-anchor": "middle" }, i));
    });
    const legend = h("div", { class: "legend" }, "每小时评价数",
      h("i", { style: "background:" + GOOD }), "好评", h("i", { style: "background:" + BAD }), "差评",
      h("i", { style: "background:" + UNRATED }), "未评价");
    $("chart-hours").replaceChildren(g, legend);
  }

  function renderBars(box, rows, label) {
    if (!rows.length) {
      box.replaceChildren(h("div", { class: "empty" }, "当日暂无评价。"));
      return;
    }
    const max = Math.max(1, ...rows.map((r) => r.votes));
    box.replaceChildren(...rows.slice(0, 12).map((r) => h("div", { class: "row", "data-key": r.key },
      h("span", { class: "label", title: label(r) }, label(r)),
      h("span", { class: "track" },
        h("span", { class: "g", style: "width:" + (100 * r.good / max) + "%" }),
        h("span", { class: "b", style: "width:" + (100 * r.bad / max) + "%" })),
      h("span", { class: "num" }, r.votes + " 评 · " + pct(r.rate)))));
  }

  // ---- devices ---------------------------------------------------------------------------
  async function loadDevices() {
    const data = await api("GET", "devices");
    const rows = data.devices.map((d) => h("tr", { "data-device": d.device_id, "data-state": d.state },
      h("td", null, h("a", { href: "#/device/" + encodeURIComponent(d.device_id) }, d.device_id)),
      h("td", null, windowName(d.window)),
      h("td", null, h("span", { class: "pill " + d.state }, d.state_label)),
      h("td", null, (d.reason_labels || []).join("、") || (d.state === "offline" && d.since ? "自 " + whenIso(d.since) : "")),
      h("td", null, whenIso(d.last_seen)),
      h("td", null, d.jd === null || d.jd === undefined ? "—" : d.jd),
      h("td", null, d.fw || "—")));
    $("devices-table").replaceChildren(
      h("thead", null, h("tr", null, ["评价器", "窗口", "状态", "说明", "最近联系", "未确认", "固件"].map((t) => h("th", null, t)))),
      h("tbody", null, rows.length ? rows : h("tr", null, h("td", { colspan: 7, class: "empty" }, "没有设备。"))));
  }

  async function loadSystem() {
    const d = await api("GET", "system");
    const p = d.province;
    const ok = (v) => v ? "正常" : "故障";
    const rows = [
      ["消息服务器", d.parts.broker === undefined ? "—" : ok(d.parts.broker)],
      ["中心与消息服务器的连接", d.parts.mqtt === undefined ? "—" : ok(d.parts.mqtt)],
      ["省平台最近接收", whenIso(p.last_success)],
      ["待上报省平台", p.unforwarded + " 条" + (p.error ? "（重试 " + p.pending_attempts + " 次：" + p.error + "）" : "")],
      ["已存评价 / 已上报", d.votes.stored + " / " + d.votes.forwarded],
      ["设备上丢失的评价", d.lost_votes + " 条"],
    ];
    const parts = [h("div", { class: "table-wrap" }, h("table", { class: "fields" },
      h("tbody", null, rows.map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v))))))];
    if (p.chain_error) parts.push(h("p", { class: "error" }, "省平台不接受本中心的批次链：新的批次暂停生成，请联系技术人员。"));
    parts.push(h("h3", null, "拒收的上报（按原因，累计）"));
    parts.push(d.rejections.length
      ? h("table", { class: "fields", "data-rejections": "1" }, h("tbody", null, d.rejections.map((r) =>
        h("tr", { "data-reason": r.reason }, h("th", null, r.label), h("td", null, r.count)))))
      : h("div", { class: "empty" }, "没有拒收。"));
    if (d.recent_rejections.length) {
      parts.push(h("h3", null, "最近拒收"));
      parts.push(h("ol", { class: "events" }, d.recent_rejections.slice(0, 20).map((r) => h("li", null,
        h("span", { class: "t" }, whenIso(r.at)), (r.device_id ? "评价器 " + r.device_id + " · " : "") + r.label +
        (r.size ? "（" + r.size + " 字节）" : "")))));
    }
    if (d.gaps.length) {
      parts.push(h("h3", null, "序号缺口（设备上丢失的评价）"));
      parts.push(h("ol", { class: "events" }, d.gaps.map((g) => h("li", null,
        h("span", { class: "t" }, whenIso(g.at)), "评价器 " + g.device_id + "：序号 " + g.detail.from + "–" +
        g.detail.to + "，丢失 " + g.detail.missing + " 条"))));
    }
    $("system").replaceChildren(...parts);
  }

  function sparkline(samples, key, label, unit) {
    const pts = samples.filter((s) => typeof s[key] === "number");
    const fig = h("figure", null);
    const last = pts.length ? pts[pts.length - 1][key] : null;
    fig.appendChild(h("figcaption", null, label + "：" + (last === null ? "—" : last + (unit || ""))));
    const W = 300, H = 60;
    const g = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img", "aria-label": label });
    if (pts.length === 1) {
      g.appendChild(svg("polyline", { points: (W - 24) + "," + H / 2 + " " + (W - 2) + "," + H / 2 }));
    } else if (pts.length > 1) {
      const t0 = pts[0].t, t1 = pts[pts.length - 1].t || t0 + 1;
      const vs = pts.map((p) => p[key]);
      const lo = Math.min(...vs), hi = Math.max(...vs);
      const span = hi - lo || 1;
      const coords = pts.map((p) => ((p.t - t0) / ((t1 - t0) || 1) * (W - 4) + 2).toFixed(1) + "," +
        (H - 4 - (p[key] - lo) / span * (H - 8)).toFixed(1));
      g.appendChild(svg("polyline", { points: coords.join(" ") }));
    }
    fig.appendChild(g);
    return fig;
  }

  function eventText(e) {
    const d = e.detail || {};
    const label = EVENT_LABELS[e.kind] || e.kind;
    if (e.kind === "state") {
      return label + "：" + (STATE_LABELS[d.from] || "—") + " → " + (STATE_LABELS[d.to] || d.to);
    }
    if (e.kind === "boot" || e.kind === "birth") return label + (d.rst ? "（复位原因 " + d.rst + "）" : "");
    if (e.kind === "gap") return label + "：" + d.from + "–" + d.to + "，丢失 " + d.missing + " 条";
    if (e.kind === "ota") {
      return label + "：" + (d.rid || "") + " " + (d.ver || "") + " " + (UPDATE_LABELS[d.state] || d.state || "") +
        (d.why ? "（" + whyText(d.why) + "）" : "");
    }
    return label;
  }

  async function loadDevice(id) {
    const panel = $("device-panel");
    let d;
    try {
      d = await api("GET", "devices/" + encodeURIComponent(id));
    } catch (e) {
      panel.replaceChildren(h("p", { class: "error" }, "找不到评价器 " + id + "。"), h("a", { href: "#/" }, "返回大厅"));
      return;
    }
    const f = d.fields || {};
    const fields = [
      ["窗口", windowName(d.window)], ["状态", d.state_label + (d.since ? "（自 " + whenIso(d.since) + "）" : "")],
      ["最近联系", whenIso(d.last_seen)], ["固件", f.fw || "—"], ["型号", f.board || "—"],
      ["运行时间", typeof f.up === "number" ? Math.floor(f.up / 3600) + " 小时 " + Math.floor(f.up % 3600 / 60) + " 分" : "—"],
      ["上次复位", f.rst || "—"], ["可用内存", typeof f.heap === "number" ? f.heap + " 字节" : "—"],
      ["未确认记录", f.jd === undefined ? "—" : f.jd + (f.old ? "（最早 " + f.old + " 秒前）" : "")],
      ["重连次数", f.rc === undefined ? "—" : f.rc], ["信号", typeof f.rssi === "number" ? f.rssi + " dBm" : "—"],
      ["卡住的按键", f.stuck && f.stuck.length ? f.stuck.join("、") + " 星键" : "无"],
      ["显示屏", f.disp === 1 ? "故障" : "正常"], ["误按（本次启动）", f.mis === undefined ? "—" : f.mis],
      ["时钟校正", f.clk === undefined ? "—" : f.clk + " 秒"],
      ["今日评价", d.today ? d.today.good + d.today.bad + "（差评 " + d.today.bad + "，好评率 " + pct(d.today.rate) + "）" : "—"],
    ];
    panel.replaceChildren(...[
      h("div", { class: "device-head" }, h("a", { href: "#/" }, "← 大厅"),
        h("h2", null, "评价器 " + d.device_id),
        h("span", { class: "pill " + d.state, "data-state": d.state }, d.state_label)),
      d.reason_labels && d.reason_labels.length ? h("p", { class: "reasons" }, "原因：" + d.reason_labels.join("、")) : null,
      h("div", { class: "table-wrap" }, h("table", { class: "fields" },
        h("tbody", null, fields.map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v)))))),
      h("h3", null, "健康记录（最近 6 小时）"),
      h("div", { class: "spark" }, sparkline(d.samples, "heap", "可用内存", " 字节"),
        sparkline(d.samples, "jd", "未确认记录", " 条"), sparkline(d.samples, "rssi", "信号", " dBm")),
      h("h3", null, "事件"),
      h("ol", { class: "events" }, d.events.length ? d.events.map((e) => h("li", null,
        h("span", { class: "t" }, whenIso(e.at)), eventText(e))) : h("li", { class: "empty" }, "暂无事件。")),
    ].filter(Boolean));
  }

  // ---- firmware updates ------------------------------------------------------------------
  async function loadUpdates() {
    const data = await api("GET", "updates");
    const box = $("updates");
    if (!data.rollouts.length) {
      box.replaceChildren(h("div", { class: "empty" }, "没有固件更新。"),
        releaseList(data.releases));
      return;
    }
    box.replaceChildren(...data.rollouts.map(rolloutCard), releaseList(data.releases));
  }

  function whyText(why) {
    if (!why) return "";
    if (WHY_LABELS[why]) return WHY_LABELS[why];
    if (why.startsWith("already on ")) return "已是该版本";
    return why;
  }

  function rolloutCard(r) {
    const c = r.counts;
    const tally = UPDATE_ORDER.filter((s) => c[s]).map((s) =>
      h("span", { class: "tally " + s, "data-count": s }, UPDATE_LABELS[s] + " " + c[s]));
    const rows = r.device_list.map((d) => {
      const pct = d.progress === null || d.progress === undefined ? null : Math.floor(d.progress * 100);
      return h("tr", { "data-device": d.device_id, "data-update-state": d.state },
        h("td", null, h("a", { href: "#/device/" + encodeURIComponent(d.device_id) }, d.device_id),
          d.canary ? h("span", { class: "tag" }, "试点") : null),
        h("td", null, windowName(d.window)),
        h("td", null, h("span", { class: "pill upd-" + d.state }, UPDATE_LABELS[d.state] || d.state)),
        h("td", null, d.state === "downloading" && pct !== null
          ? h("span", { class: "progress", title: d.off + " / " + d.size + " 字节" },
            h("span", { class: "track" }, h("span", { class: "bar", style: "width:" + pct + "%" })),
            h("span", { class: "num" }, pct + "%"))
          : whyText(d.why)),
        h("td", null, d.fw || "—"),
        h("td", null, d.online ? "在线" : "离线"),
        h("td", null, whenIso(d.updated_at)));
    });
    return h("article", { class: "rollout state-" + r.state, "data-rollout": r.rid, "data-state": r.state, "data-stage": r.stage },
      h("header", null,
        h("b", null, r.rid + " · 固件 " + r.version), " ", h("span", { class: "meta" }, "型号 " + r.board),
        h("span", { class: "pill roll-" + r.state }, ROLLOUT_LABELS[r.state] || r.state),
        r.state === "running" || r.state === "paused" ? h("span", { class: "meta" }, "阶段：" + (STAGE_LABELS[r.stage] || r.stage)) : null),
      h("div", { class: "meta" }, "试点 " + r.canary + " 台，之后每批最多 " + r.batch + " 台，失败超过 " +
        r.max_failures + " 台即中止 · 开始于 " + whenIso(r.created_at)),
      r.why ? h("p", { class: "error" }, "中止原因：" + r.why) : null,
      h("div", { class: "tallies" }, tally.length ? tally : "还没有设备。"),
      rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "devices updates" },
        h("thead", null, h("tr", null, ["评价器", "窗口", "更新状态", "进度 / 原因", "当前固件", "连接", "更新于"].map((t) => h("th", null, t)))),
        h("tbody", null, rows))) : null);
  }

  function releaseList(releases) {
    if (!releases.length) return h("div", null);
    return h("details", { class: "releases" }, h("summary", null, "已登记的固件版本（" + releases.length + "）"),
      h("table", { class: "fields" }, h("tbody", null, releases.map((r) => h("tr", { "data-release": r.version + "/" + r.board },
        h("th", null, r.version + " · " + r.board),
        h("td", null, r.size + " 字节 · SHA-256 " + r.sha256.slice(0, 16) + "…" + (r.notes ? " · " + r.notes : "")))))));
  }

  // ---- wiring ----------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", onLogout);
    $("chart-day").addEventListener("change", (ev) => { state.chartDay = ev.target.value; loadCharts(); });
    window.addEventListener("hashchange", () => route().catch(() => {}));
    // Heartbeats and the province link change without an event of their own: the device
    // views look again now and then while they are open.
    setInterval(() => {
      if (!state.me || document.hidden) return;
      if (!$("devices-view").hidden) loadSystem().catch(() => {});
      if (!$("device-view").hidden && state.route.startsWith("#/device/")) {
        loadDevice(decodeURIComponent(state.route.slice(9))).catch(() => {});
      }
    }, 10000);
    // Download progress moves with every chunk: the updates view looks every 2 s.
    setInterval(() => {
      if (state.me && !document.hidden && !$("updates-view").hidden) loadUpdates().catch(() => {});
    }, 2000);
    start().catch(() => showLogin());
  });
}());
