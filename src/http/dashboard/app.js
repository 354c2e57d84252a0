// settle's dashboard: plain JavaScript, no framework, no build step. Every value from the API
// reaches the page through textContent or a number formatter, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "settle.token";
  const POLL_MS = 1000;
  // A request not answered by then counts as not answered. A reading: its list goes stale
  // rather than read as live while the API (or something in front of it) holds the connection
  // open. An action waits past the API's own limit (`http.request_timeout_ms`, 30 s by
  // default), so that a slow write is answered by the API (503 OUTCOME_UNKNOWN at worst)
  // rather than given up on here while it may still be done.
  const READ_MS = 5000;
  const ACTION_MS = 35000;
  const PRODUCTS_EVERY = 5; // polls: stock changes slower than job progress matters
  // Lists ask for no `limit`: the server's `pagination.default_page_size` (newest first) is
  // a screenful, and a page size over a lowered `max_page_size` would only be refused.
  const CANCELLABLE = new Set(["QUEUED", "RUNNING"]);
  const RETRYABLE = new Set(["FAILED", "CANCELLED"]);

  const numbers = new Intl.NumberFormat();
  const money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const dated = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

  const $ = (id) => document.getElementById(id);

  /** An element with a class and text; text goes through textContent, so it is never markup. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // ---- The API: every call carries the tab's token. ----

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  /** No answer (status 0): none within `ms`, or none at all (refused, cut off). */
  function noAnswer(error, ms) {
    return error && error.name === "TimeoutError"
      ? new ApiError(0, "NO_ANSWER", `the settle API did not answer within ${ms / 1000} s`)
      : new ApiError(0, "UNREACHABLE", "the settle API did not answer; is it running?");
  }

  /** The API's JSON object answering `method` on `path` (`body` sent as JSON, `extra` headers
   * added). Anything else throws an ApiError: the API's refusal, no answer, or a 2xx that is not
   * the API's JSON, such as the sign-in page a single-sign-on proxy in front of the API
   * redirects to once its session expires. */
  async function api(method, path, body, extra) {
    const headers = { Accept: "application/json", ...authHeaders(), ...extra };
    const ms = method === "GET" ? READ_MS : ACTION_MS;
    const init = { method, headers, signal: AbortSignal.timeout(ms) };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    let text;
    try {
      response = await fetch(path, init);
      text = await response.text();
    } catch (error) {
      throw noAnswer(error, ms);
    }
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!response.ok) throw refused(response, data);
    if (data === null || typeof data !== "object") throw notTheApis(response, "JSON");
    return data;
  }

  /** The API's refusal (`data`, its parsed JSON body, or null) of `response`, not 2xx. */
  function refused(response, data) {
    const error = (data && data.error) || {};
    return new ApiError(response.status, error.code || "HTTP_" + response.status,
      error.message || response.statusText || "request failed");
  }

  /** A 2xx `response` that is not the `what` (JSON, CSV) the API answers with. */
  function notTheApis(response, what) {
    const type = (response.headers.get("Content-Type") || "no type").split(";")[0];
    const from = response.redirected ? ` from ${new URL(response.url).pathname}` : "";
    return new ApiError(response.status, "NOT_" + what, `the answer was not ${what} (${type}${from}): `
      + "a proxy in front of the API may want you to sign in again; reload the page");
  }

  /** The settlement CSV at `path`, as a Blob. Throws an ApiError for no answer within READ_MS
   * (once it begins, the file takes as long as it takes), the API's refusal, or a 2xx that is
   * not a CSV (a proxy's sign-in page), which would otherwise be saved as the settlement. */
  async function fetchCsv(path) {
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new DOMException("no answer", "TimeoutError")), READ_MS);
    let response;
    try {
      response = await fetch(path, { headers: authHeaders(), signal: controller.signal });
    } catch (error) {
      throw noAnswer(error, READ_MS);
    } finally {
      clearTimeout(timer);
    }
    const type = (response.headers.get("Content-Type") || "").split(";")[0].trim();
    if (!response.ok) {
      const data = type === "application/json" ? await response.json().catch(() => null) : null;
      throw refused(response, data);
    }
    if (type !== "text/csv") throw notTheApis(response, "CSV");
    try {
      return await response.blob();
    } catch (_) {
      throw new ApiError(0, "CUT_OFF", "the download was cut off before its end; try again");
    }
  }

  /** One sentence an operator can act on. */
  function explain(what, error) {
    const code = error.status ? `${error.status} ${error.code}` : error.code;
    if (error.status === 401) {
      return token()
        ? `${what}: the API did not accept this token (${code}). Paste a valid token above and press Enter.`
        : `${what}: the API needs a token (${code}). Paste one above and press Enter.`;
    }
    if (error.status === 403) {
      return `${what}: this token's role may not do that (${code}). Use a token with the right role.`;
    }
    return `${what}: ${error.message} (${code}).`;
  }

  // ---- The notice: one message at a time; a list's message clears once that list loads, and
  // never replaces an action's. ----

  let noticeSource = null;

  function notify(source, message, ok) {
    noticeSource = source;
    $("notice-text").textContent = message;
    $("notice").classList.toggle("ok", Boolean(ok));
    $("notice").hidden = false;
  }

  function clearNotice(source) {
    if (source === undefined || noticeSource === source) {
      $("notice").hidden = true;
      noticeSource = null;
    }
  }

  // ---- Formatting. ----

  function count(n) {
    return numbers.format(Number(n) || 0);
  }

  function when(iso) {
    if (!iso) return el("span", "time", "—");
    const at = new Date(iso);
    const today = at.toDateString() === new Date().toDateString();
    const node = el("span", "time", today ? clock.format(at) : dated.format(at));
    node.title = at.toString();
    return node;
  }

  /** A job's input in a few words: a settlement's days, else `key value` pairs. */
  function describeParams(job) {
    const p = job.params || {};
    if (typeof p.from === "string" && typeof p.to === "string") {
      return p.from === p.to ? p.from : `${p.from} → ${p.to}`;
    }
    return Object.entries(p)
      .map(([key, value]) => `${key} ${typeof value === "number" ? count(value) : JSON.stringify(value)}`)
      .join(" · ");
  }

  // ---- Jobs. ----

  const rows = new Map(); // job id -> { row, cells, status }

  function jobRow(id) {
    const row = el("tr");
    row.dataset.jobId = String(id);
    const cells = {
      id: el("td", "num job-id"),
      kind: el("td"),
      status: el("td"),
      progress: el("td"),
      processed: el("td", "num processed"),
      started: el("td"),
      finished: el("td"),
      actions: el("td"),
    };
    Object.values(cells).forEach((cell) => row.appendChild(cell));
    return { row, cells, status: null };
  }

  function progressBar(job) {
    const wrap = el("div", `progress s-${job.status.toLowerCase()}-bar`);
    const bar = el("div", "bar");
    const fill = el("div", "fill");
    const pct = Math.max(0, Math.min(100, Number(job.progress) || 0));
    fill.style.width = pct + "%";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", String(pct));
    bar.appendChild(fill);
    wrap.append(bar, el("span", "pct", pct + "%"));
    return wrap;
  }

  function actionButton(label, className, path, job, doing) {
    const button = el("button", className, label);
    button.type = "button";
    button.dataset.action = label.toLowerCase();
    button.addEventListener("click", async () => {
      button.disabled = true;
      button.textContent = doing;
      try {
        await api("POST", path);
        clearNotice("action");
        // Done: the row's buttons are rebuilt at the next reading even if the status reads as
        // before (a retried job that failed again between two readings: FAILED, FAILED).
        const entry = rows.get(job.job_id);
        if (entry) entry.status = null;
      } catch (error) {
        notify("action", explain(`${label} job #${job.job_id}`, error));
        // Nothing changed: the button is the operator's again (rows keep their buttons
        // until the job's status changes).
        button.disabled = false;
        button.textContent = label;
      }
      await refreshJobs();
    });
    return button;
  }

  function downloadLink(job) {
    const link = el("a", "download", "Download CSV");
    link.href = job.download_url;
    link.download = `settlement-${job.job_id}.csv`;
    // A plain link cannot send the token: fetch with it and hand the file over.
    link.addEventListener("click", async (event) => {
      if (!token()) return;
      event.preventDefault();
      try {
        const url = URL.createObjectURL(await fetchCsv(job.download_url));
        const save = el("a");
        save.href = url;
        save.download = link.download;
        save.click();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (error) {
        notify("action", explain(`Download of job #${job.job_id}`, error));
      }
    });
    return link;
  }

  function actions(job) {
    const box = el("div", "actions");
    const id = encodeURIComponent(job.job_id);
    if (CANCELLABLE.has(job.status)) {
      box.appendChild(actionButton("Cancel", "danger", `/api/v1/jobs/${id}/cancel`, job, "Cancelling…"));
    }
    if (RETRYABLE.has(job.status)) {
      box.appendChild(actionButton("Retry", "", `/api/v1/jobs/${id}/retry`, job, "Retrying…"));
    }
    if (job.status === "COMPLETED" && typeof job.download_url === "string"
        && job.download_url.startsWith("/downloads/")) {
      box.appendChild(downloadLink(job));
    }
    return box;
  }

  function fillJob(entry, job) {
    const { row, cells } = entry;
    row.dataset.status = job.status;
    cells.id.textContent = "#" + job.job_id;
    const kind = el("span", "kind", job.kind);
    const params = el("span", "params", describeParams(job));
    cells.kind.replaceChildren(kind, params);
    if (job.error && job.status !== "COMPLETED") {
      cells.kind.appendChild(el("span", "error-text", job.error));
    }
    cells.status.replaceChildren(el("span", `pill s-${job.status.toLowerCase()}`, job.status));
    cells.progress.replaceChildren(progressBar(job));
    const processed = el("span", "", count(job.processed));
    cells.processed.replaceChildren(processed);
    if (job.total > 0) cells.processed.append(el("span", "of", ` / ${count(job.total)}`));
    cells.started.replaceChildren(when(job.started_at));
    cells.finished.replaceChildren(when(job.finished_at));
    // Buttons change only with the status, so a click in flight is not swept away.
    if (entry.status !== job.status) {
      cells.actions.replaceChildren(actions(job));
      entry.status = job.status;
    }
  }

  /** How many of the listed jobs are in each state, busiest first: the queue at a glance. A
   * state in `more` had more jobs than its page listed: its count is a floor ("50+"). */
  function showSummary(jobs, more) {
    const order = ["RUNNING", "CANCELLING", "QUEUED", "FAILED", "CANCELLED", "COMPLETED"];
    const tally = new Map();
    jobs.forEach((job) => tally.set(job.status, (tally.get(job.status) || 0) + 1));
    $("jobs-summary").replaceChildren(...order.filter((s) => tally.has(s)).map((status) => {
      const item = el("span");
      const floor = more.has(status) ? "+" : "";
      item.append(el("b", "", count(tally.get(status)) + floor), " " + status.toLowerCase());
      return item;
    }));
  }

  // ---- What the lists show: only what the applied token may read, and never as live what
  // could not be read again. ----

  /** Bumped when a token is applied: a reading begun under the previous token is dropped. */
  let generation = 0;

  /** A list on the page: its card, its label, how it empties, and when it was last read. */
  function pageList(name, label, empty, staleLabel) {
    const card = $(name + "-body").closest(".card");
    // Readings are numbered as they begin (`begun`); one that ends after a later one was shown
    // (`lastShown`) is older than the page and is dropped: a poll's, begun before a Cancel,
    // would show the cancelled job QUEUED again.
    return {
      source: "load " + name, card, label, empty, staleLabel, readAt: null, begun: 0, lastShown: 0,
    };
  }

  /** Shows that `list` was read just now, with `text` as its label. */
  function shown(list, text) {
    list.readAt = new Date();
    list.card.classList.remove("stale");
    $(list.label).textContent = text;
  }

  /** Empties `list` (rows, buttons, counts); its label says why when `error` refused it. */
  function hide(list, error) {
    list.empty();
    list.readAt = null;
    list.card.classList.remove("stale");
    $(list.label).textContent = error ? `Not shown · ${error.status} ${error.code}` : "";
  }

  /** A reading of `list` failed with `error`. 401: the API takes the token for nothing now, so
   * every list empties; 403: its role may not read this list, which empties. Anything else (no
   * answer, a 5xx) may pass: the rows stay, marked stale since they were last read. */
  function failed(list, error) {
    if (error.status === 401) {
      Object.values(lists).forEach((each) => hide(each, error));
    } else if (error.status === 403) {
      hide(list, error);
    } else if (list.readAt) {
      list.card.classList.add("stale");
      $(list.label).textContent = list.staleLabel("Stale since " + clock.format(list.readAt));
    }
  }

  /** A page of a list (`{ data: [...], next_cursor }`) at `path`. */
  async function getPage(path) {
    const page = await api("GET", path);
    if (!Array.isArray(page.data)) {
      throw new ApiError(200, "NOT_A_PAGE", "the answer was not a page of the list (no data array)");
    }
    return page;
  }

  /** The pages at `paths` (`[what, path]` pairs) of `list`, read together for the polling loop;
   * null when any could not be had (the notice says why, and `failed` handles the list), or
   * silently when a token was applied meanwhile (that token's own reading shows) or a reading
   * begun later was shown first. */
  async function read(list, paths) {
    const reading = generation;
    const number = ++list.begun;
    const answers = await Promise.all(paths.map(([what, path]) => getPage(path)
      .then((page) => ({ page }), (error) => ({ what, error }))));
    if (reading !== generation || number < list.lastShown) return null;
    list.lastShown = number;
    const failures = answers.filter((answer) => answer.error);
    if (failures.length === 0) {
      clearNotice(list.source);
      return answers.map((answer) => answer.page);
    }
    // A refusal says more than a failure that may pass; 401 more than 403.
    const worst = [401, 403].map((status) => failures.find((f) => f.error.status === status))
      .find(Boolean) || failures[0];
    // An action's notice says more than a poll's (often the same refusal): it stays until
    // closed or the next action.
    if (noticeSource !== "action") {
      notify(list.source, explain("Loading " + worst.what, worst.error));
    }
    failed(list, worst.error);
    return null;
  }

  /** The states a job can still leave: each is listed however old its jobs are. */
  const LIVE = ["RUNNING", "CANCELLING", "QUEUED"];

  /** The newest page of jobs, and a page of each live state's (a running job older than the
   * newest page keeps its row and its Cancel button), newest first. */
  async function refreshJobs() {
    const pages = await read(lists.jobs, [
      ...LIVE.map((s) => [s.toLowerCase() + " jobs", "/api/v1/jobs?status=" + s]),
      ["jobs", "/api/v1/jobs"],
    ]);
    if (!pages) return;
    // A live state's page that came back full (it has a next page) lists only the newest of
    // them: its count is at least that. The finished states are counted among the newest page.
    const more = new Set(LIVE.filter((_, i) => pages[i].next_cursor));
    // The newest page last, so its copy of a job wins: the state pages only add the jobs it
    // does not hold (each was read at its own instant; a job may have moved between them).
    const byId = new Map();
    pages.forEach((page) => page.data.forEach((job) => byId.set(job.job_id, job)));
    const jobs = [...byId.values()].sort((a, b) => b.job_id - a.job_id);
    // Rows of jobs no longer listed go first, so that the others keep their places.
    for (const [id, entry] of rows) {
      if (!byId.has(id)) {
        entry.row.remove();
        rows.delete(id);
      }
    }
    const body = $("jobs-body");
    jobs.forEach((job, index) => {
      let entry = rows.get(job.job_id);
      if (!entry) {
        entry = jobRow(job.job_id);
        rows.set(job.job_id, entry);
      }
      fillJob(entry, job);
      // In the page's order, newest first. A row in its place stays put: moving a node takes
      // the keyboard focus off a button in it, so a Tab-focused Cancel would lose it each poll.
      const at = body.children[index];
      if (at !== entry.row) body.insertBefore(entry.row, at || null);
    });
    $("jobs-empty").hidden = jobs.length > 0;
    showSummary(jobs, more);
    shown(lists.jobs, "Live · updated " + clock.format(new Date()));
  }

  function emptyJobs() {
    rows.forEach((entry) => entry.row.remove());
    rows.clear();
    $("jobs-empty").hidden = true;
    $("jobs-summary").replaceChildren();
  }

  // ---- Products. ----

  let productsCount = ""; // the label of the products last read
  // The page shown: the cursor it is read from (null: the newest), the cursors of the pages
  // before it (to go back), and the next page's cursor as last read (null while a move to
  // another page is being read, so a second click waits for it). Products are never deleted:
  // an older page keeps its rows while new products push onto the newest.
  let productsCursor = null;
  const productsBefore = [];
  let productsNext = null;

  async function refreshProducts() {
    const cursor = productsCursor;
    const path = "/api/v1/products" + (cursor ? "?cursor=" + encodeURIComponent(cursor) : "");
    const pages = await read(lists.products, [["products", path]]);
    // A reading of the page shown before Older or Newer was pressed is not this page.
    if (!pages || cursor !== productsCursor) return;
    const [page] = pages;
    const number = productsBefore.length + 1;
    productsNext = page.next_cursor;
    $("products-older").hidden = !page.next_cursor;
    $("products-newer").hidden = number === 1;
    $("products-pager").hidden = !page.next_cursor && number === 1;
    const body = $("products-body");
    body.replaceChildren(...page.data.map((product) => {
      const row = el("tr");
      row.dataset.productId = String(product.id);
      const name = el("td");
      name.append(el("span", "kind", product.name), el("span", "params", "#" + product.id));
      const stock = product.stock > 0
        ? el("td", "num", count(product.stock))
        : el("td", "num sold-out", "Sold out");
      row.append(name, el("td", "num", money.format(product.price_cents / 100)),
        el("td", "num", count(product.sold)), stock);
      return row;
    }));
    $("products-empty").hidden = page.data.length > 0;
    if (number > 1) {
      productsCount = `page ${count(number)}${page.next_cursor ? "" : " · the oldest"}`;
    } else {
      productsCount = page.next_cursor
        ? `newest ${count(page.data.length)}`
        : `${count(page.data.length)} ${page.data.length === 1 ? "product" : "products"}`;
    }
    shown(lists.products, productsCount);
  }

  function emptyProducts() {
    $("products-body").replaceChildren();
    $("products-empty").hidden = true;
    $("products-pager").hidden = true;
    productsCursor = null;
    productsBefore.length = 0;
    productsNext = null;
  }

  $("products-older").addEventListener("click", () => {
    if (!productsNext) return;
    productsBefore.push(productsCursor);
    productsCursor = productsNext;
    productsNext = null;
    refreshProducts();
  });
  $("products-newer").addEventListener("click", () => {
    if (productsBefore.length === 0) return;
    productsCursor = productsBefore.pop();
    productsNext = null;
    refreshProducts();
  });

  const lists = {
    jobs: pageList("jobs", "jobs-updated", emptyJobs, (stale) => stale),
    products: pageList("products", "products-count", emptyProducts,
      (stale) => `${productsCount} · ${stale.toLowerCase()}`),
  };

  // ---- The token: applied on Enter, kept for this tab only. ----

  function showTokenState() {
    $("token-state").textContent = token() ? "Applied · kept for this tab" : "No token";
  }

  /** What keeps `value` from being a token this service issues (`settle_` and 64 hex digits,
   * 0-9 and a-f), in words, or null. Checked before it is sent: a character a header cannot
   * carry (a zero-width space pasted along) would make every call fail as if unanswered. */
  function tokenProblem(value) {
    if (/^bearer /i.test(value)) return "paste the token alone, without “Bearer ”";
    if (!value.startsWith("settle_")) return "it does not start with settle_";
    const digits = [...value.slice("settle_".length)];
    const stray = digits.findIndex((c) => !/[0-9a-f]/.test(c));
    if (stray >= 0) {
      const c = digits[stray];
      const code = "U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
      const shown = /[!-~]/.test(c) ? `“${c}” (${code})` : code;
      return `it has ${shown} at character ${"settle_".length + stray + 1}, where only 0-9 and a-f belong`;
    }
    if (digits.length !== 64) {
      return `it has ${digits.length} hex digits after settle_, not 64 (${digits.length < 64 ? "cut short?" : "pasted twice?"})`;
    }
    return null;
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    const problem = value && tokenProblem(value);
    if (problem) {
      notify("action", `This token was not applied: ${problem}. A settle token is settle_ and 64 hex digits.`);
      $("token-state").textContent = token() ? "Not applied · the previous token stays" : "Not applied";
      return;
    }
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    clearNotice();
    // Nothing the previous token read stays on the page, nor arrives later.
    generation += 1;
    Object.values(lists).forEach((each) => hide(each));
    refreshJobs();
    refreshProducts();
  });

  // ---- Starting a settlement. ----

  function isoDay(date) {
    const pad = (n) => String(n).padStart(2, "0");
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  }

  /** A new Idempotency-Key. Not crypto.randomUUID: that needs a secure context (https or
   * localhost), and the page may be served over plain http on an internal name. */
  function newKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "dashboard-" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  /** The days and Idempotency-Key of the last settlement asked for while it is not known
   * whether the API started it: asked for again, the same days go with the same key, so the
   * API answers what happened instead of starting a second job. Any other answer ends it. */
  let unsettled = null;

  /** Whether `error` leaves it unknown whether the request was carried out. */
  function outcomeUnknown(error) {
    return error.status === 0
      || ["OUTCOME_UNKNOWN", "IDEMPOTENCY_KEY_IN_USE", "NOT_JSON"].includes(error.code);
  }

  $("settlement-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const submit = $("settle-submit");
    const from = $("settle-from").value;
    const to = $("settle-to").value;
    const days = `${from}/${to}`;
    const key = unsettled && unsettled.days === days ? unsettled.key : newKey();
    unsettled = null;
    submit.disabled = true;
    $("settle-result").textContent = "";
    try {
      const job = await api("POST", "/api/v1/jobs/settlement", { from, to }, { "Idempotency-Key": key });
      $("settle-result").textContent = `Settlement #${job.job_id} queued.`;
      clearNotice("action");
      await refreshJobs();
    } catch (error) {
      let said = explain("Starting the settlement", error);
      if (outcomeUnknown(error)) {
        unsettled = { days, key };
        said += " Start it again with the same days to find out: the same Idempotency-Key goes"
          + " with them, so it is not started twice.";
      }
      notify("action", said);
    } finally {
      submit.disabled = false;
    }
  });

  // ---- Start. ----

  $("notice-close").addEventListener("click", () => clearNotice());
  $("token").value = token();
  showTokenState();
  // Yesterday, the day an operator most often settles.
  const yesterday = isoDay(new Date(Date.now() - 24 * 3600 * 1000));
  $("settle-from").value = yesterday;
  $("settle-to").value = yesterday;

  let polls = 0;
  async function poll() {
    // Whatever a reading throws, the next poll comes: the page never stops reading while its
    // label says when it last read.
    try {
      if (!document.hidden) {
        await refreshJobs();
        if (polls % PRODUCTS_EVERY === 0) await refreshProducts();
        polls += 1;
      }
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshJobs();
  });
  poll();
})();
