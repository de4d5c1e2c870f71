// The blocklora page: plain JavaScript, no library, no build step. It only calls this server's /v1 API.
// Everything a user or a concept's owner wrote (names, class words, owners, prompts, errors) is put on
// the page as text (textContent / createTextNode), never parsed as HTML. Tokens and the API key stay in
// their input fields (this tab's memory) and travel only in the Authorization header.
"use strict";

// A federation is a library that may hold thousands of concepts: the page asks for them a page at a
// time (cards, completions), never for the whole listing, and reloads cards only when the version moves.
const REFRESH_MS = 4000;
const PAGE = 24;        // cards asked for at a time ("Show more" asks for the next page)
const MAX_PAGE = 100;   // the most cards one /v1/federation/concepts call gives
const SUGGEST = 8;      // {name} completions asked for at a time
const $ = (id) => document.getElementById(id);

const state = {
  overview: null,       // the last GET /v1/federation
  cards: null,          // the last /v1/federation/concepts answer, with the cards of every page shown
  cardsVersion: null,   // the federation version the cards were loaded at
  collections: [],      // the last GET /v1/collections
  known: new Map(),     // name -> {class_word, slot} of the concepts the page has seen (picker rows, prompts)
  suggested: [],        // the names in the {name} list
  weightBound: 4,       // |weight| allowed per concept (ConceptWeight.weight)
  thumbs: new Map(),    // thumbnail URL -> blob: URL of the picture
  cardsKey: "",         // what the cards were last drawn from, so a refresh keeps focus where it is
  pickerKey: "",
  collectionsKey: "",
  seq: { cards: 0, suggest: 0, clash: 0 },  // the latest call of each kind: an older answer is dropped
  resultsVersion: null, // the federation version the pictures shown were drawn at
  active: -1,           // the highlighted {name} suggestion
};

// -- small DOM helpers: text only ------------------------------------------------------------------
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "for") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function say(id, text) { $(id).textContent = text || ""; }

function ago(seconds) {
  const s = Math.round(Math.abs(seconds));
  const span = s < 90 ? `${s} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
  return seconds >= 0 ? `${span} ago` : `in ${span}`;
}

// "3 min ago" / "in 5 min" against the server's clock; `retime` updates them on each refresh.
function when(at, now) {
  if (!at) return el("span", { text: "(time not recorded)" });
  const t = new Date(at * 1000);
  return el("time", { class: "when", dateTime: t.toISOString(), title: t.toLocaleString(), "data-at": String(at),
                      text: ago(now - at) });
}

function retime(container, now) {
  for (const t of container.querySelectorAll("time.when")) t.textContent = ago(now - Number(t.dataset.at));
}

// -- the API ---------------------------------------------------------------------------------------
function bearer(secret) { return secret ? { Authorization: `Bearer ${secret}` } : {}; }
function apiKey() { return $("api-key").value.trim(); }

class ApiError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

// The API's own words for a refusal: "404: concept(s) ['x'] are not live …", "422: steps: Input should be …".
async function refusal(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
    }
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, `${response.status}: ${detail}`);
}

async function call(method, path, { json, body, secret } = {}) {
  const headers = bearer(secret);
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: json !== undefined ? JSON.stringify(json) : body,
    credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
  if (!response.ok) throw await refusal(response);
  return response;
}

// -- bounds from the OpenAPI schema: the inputs allow what GenerateRequest allows ---------------------------
async function loadBounds() {
  const schema = await (await call("GET", "/v1/openapi.json")).json();
  const props = schema.components.schemas.GenerateRequest.properties;
  const fields = { seed: "seed", steps: "steps", guidance: "guidance_scale", width: "width", height: "height",
                   "num-images": "num_images" };
  for (const [id, key] of Object.entries(fields)) {
    const p = props[key];
    const range = (p.anyOf || [p]).find((x) => x.type === "integer" || x.type === "number") || p;
    const input = $(id);
    if (range.minimum !== undefined) input.min = range.minimum;
    if (range.maximum !== undefined) input.max = Math.min(range.maximum, Number.MAX_SAFE_INTEGER);
    if (range.multipleOf !== undefined) input.step = range.multipleOf;
    if (p.default !== undefined && p.default !== null) input.value = p.default;
  }
  $("prompt").maxLength = props.prompt.maxLength;
  $("negative").maxLength = props.negative_prompt.maxLength;
  const weight = schema.components.schemas.ConceptWeight;
  if (weight) state.weightBound = weight.properties.weight.maximum;
}

// -- the federation at a glance ------------------------------------------------------------------------
async function refresh() {
  try {
    const [overview, collections] = await Promise.all([
      call("GET", "/v1/federation").then((r) => r.json()), call("GET", "/v1/collections").then((r) => r.json())]);
    state.overview = overview;
    state.collections = collections.collections;
    say("connection", "");
    if (overview.version !== state.cardsVersion) await loadCards(false);
    render(overview);
  } catch (err) {
    say("connection", `Cannot reach the federation: ${err.message}`);
  }
}

function render(o) {
  say("fact-version", String(o.version));
  say("fact-base", o.base.spec);
  $("fact-base").title = o.base.spec;
  say("fact-fingerprint", o.base.fingerprint.slice(0, 12));
  $("fact-fingerprint").title = o.base.fingerprint;
  say("fact-resolution", `${o.base.resolution} px`);
  say("fact-slots", `${o.slots.live} live · ${o.slots.held} held · ${o.slots.free} of ${o.slots.total} slots free`);
  say("fact-collections", String(o.collections));
  $("api-key-field").hidden = !o.api_key_required;
  $("width").placeholder = $("height").placeholder = String(o.base.resolution);
  renderCollections();
  renderPicker();
  renderCards();
  renderHeld(o);
  noteStaleResults();
}

function noteStaleResults() {
  const v = state.resultsVersion;
  const now = state.overview && state.overview.version;
  say("results-note", v !== null && now !== null && v !== now
    ? `These pictures were drawn at version ${v}; the federation is at version ${now} now.` : "");
}

// The live cards in name order, whose names start with the filter: `more` adds the next page; otherwise
// the pages shown so far are asked for again (after a change of version or filter).
async function loadCards(more) {
  const seq = ++state.seq.cards;
  const shown = state.cards ? state.cards.cards.length : 0;
  const params = new URLSearchParams({ limit: String(more ? PAGE : Math.min(MAX_PAGE, Math.max(PAGE, shown))) });
  const prefix = $("cards-filter").value.trim();
  if (prefix) params.set("prefix", prefix);
  if (more) params.set("cursor", state.cards.next_cursor);
  try {
    const page = await (await call("GET", `/v1/federation/concepts?${params}`)).json();
    if (seq !== state.seq.cards) return;
    for (const c of page.cards) state.known.set(c.name, c);
    const added = more ? page.cards : null;
    if (more) page.cards = state.cards.cards.concat(page.cards);
    state.cards = page;
    state.cardsVersion = page.version;
    renderCards(added);
    renderPicker();
  } catch (err) {
    if (seq === state.seq.cards) say("cards-count", err.message);
  }
}

// `added`: cards of a page just appended (drawn below the others, so focus and thumbnails stay).
function renderCards(added) {
  const page = state.cards;
  if (!page) return;
  const now = state.overview ? state.overview.now : page.now;
  const filtered = $("cards-filter").value.trim() !== "";
  $("cards-empty").hidden = page.total > 0 || filtered;
  say("cards-count", page.total === 0 ? (filtered ? "No live concept's name starts so." : "")
    : `${page.cards.length} of ${page.total} shown, in name order`);
  $("cards-more").hidden = page.next_cursor === null;
  const key = JSON.stringify([page.version, page.cards.map((c) => c.thumbnail)]);
  if (key === state.cardsKey) {  // the same cards: keep them (and the focus), move only the "… ago" texts
    retime($("cards"), now);
    return;
  }
  state.cardsKey = key;
  if (added) $("cards").append(...added.map((c) => card(c, now)));
  else $("cards").replaceChildren(...page.cards.map((c) => card(c, now)));
}

function card(c, now) {
  const img = el("img", { class: "thumb", alt: `Thumbnail of ${c.name}`, width: 96, height: 96 });
  const figure = el("div", { class: "thumb-box" }, img);
  loadThumbnail(c, img, figure);
  const remove = el("button", { type: "button", class: "danger", text: "Remove" });
  remove.setAttribute("aria-label", `Remove ${c.name}`);
  remove.addEventListener("click", () => removeConcept(c.name));
  return el("li", { class: "card", "data-concept": c.name },
    figure,
    el("div", { class: "card-body" },
      el("h3", { class: "card-name", text: c.name }),
      el("dl", { class: "card-facts" },
        el("div", {}, el("dt", { text: "class word" }), el("dd", { class: "class-word", text: c.class_word })),
        el("div", {}, el("dt", { text: "slot" }), el("dd", { text: String(c.slot) })),
        el("div", {}, el("dt", { text: "trigger" }), el("dd", {}, el("code", { text: c.triggers.join(" ") }))),
        el("div", {}, el("dt", { text: "owner" }), el("dd", { class: "owner", text: c.owner })),
        el("div", {}, el("dt", { text: "live" }),
           el("dd", { class: "since" }, when(c.live_at, now), ` · version ${c.version}`))),
      remove));
}

async function loadThumbnail(c, img, box) {
  const cached = state.thumbs.get(c.thumbnail);
  if (cached) { img.src = cached; return; }
  if (state.overview.api_key_required && !apiKey()) {  // asked again when a key is typed
    img.alt = `Thumbnail of ${c.name}: enter the API key to see it`;
    box.classList.add("failed");
    return;
  }
  box.classList.remove("failed");
  box.classList.add("waiting");
  img.alt = `Thumbnail of ${c.name}: being drawn while the server is idle`;
  try {
    const r = await call("GET", c.thumbnail, { secret: apiKey() });
    if (r.status === 202) {
      const retry = 1000 * Number(r.headers.get("Retry-After") || 2);
      setTimeout(() => { if (box.isConnected) loadThumbnail(c, img, box); }, retry);
      return;
    }
    const url = URL.createObjectURL(await r.blob());
    state.thumbs.set(c.thumbnail, url);
    img.src = url;
    img.alt = `Thumbnail of ${c.name}`;
    box.classList.remove("waiting");
  } catch (err) {
    img.alt = `No thumbnail of ${c.name}: ${err.message}`;
    box.classList.remove("waiting");
    box.classList.add("failed");
  }
}

function renderHeld(o) {
  $("held-empty").hidden = o.held.length > 0;
  say("held-more", o.held_total > o.held.length ? `and ${o.held_total - o.held.length} more (first ${o.held.length} by name shown)` : "");
  $("held").replaceChildren(...o.held.map((h) => {
    const p = h.progress;
    const done = p ? el("progress", { max: p.steps, value: p.step }) : null;
    if (done) done.setAttribute("aria-label", `${h.name}: step ${p.step} of ${p.steps}`);
    const left = p && p.eta_s !== null ? Math.max(0, p.eta_s - (o.now - p.at)) : null;  // ETA as of now
    const eta = left === null ? "" : ` · about ${ago(-left).replace("in ", "")} left`;
    return el("li", { class: "held-item", "data-concept": h.name },
      el("div", { class: "held-head" }, el("strong", { text: h.name }), ` (${h.class_word}) · slot ${h.slot}`),
      el("div", {}, "by ", el("span", { class: "owner", text: h.owner }), " · reserved ", when(h.reserved_at, o.now),
         " · expires ", when(h.expires_at, o.now)),
      p ? el("div", { class: "held-progress" }, done,
             el("span", {}, `step ${p.step}/${p.steps}${eta} · reported `, when(p.at, o.now)))
        : el("div", { class: "help", text: "no step reported yet" }));
  }));
}

// -- collection, concept picker and {name} completion -----------------------------------------------------
function chosenCollection() {
  return state.collections.find((c) => c.name === $("collection").value) || null;
}

function memberNames() {
  const c = chosenCollection();
  return c ? Object.keys(c.members) : [];
}

function renderCollections() {
  const key = JSON.stringify(state.collections.map((c) => [c.name, c.owner, c.members]));
  if (key === state.collectionsKey) return;
  state.collectionsKey = key;
  const select = $("collection");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", text: "none" }), ...state.collections.map((c) =>
    el("option", { value: c.name, text: `${c.name} (${Object.keys(c.members).length} concepts; ${c.owner})` })));
  select.value = state.collections.some((c) => c.name === chosen) ? chosen : "";
  showMembers();
}

// The chosen collection's members, with their class words (asked for once: the side-by-side prompts
// name a left-out concept by its class word).
async function showMembers() {
  const c = chosenCollection();
  const members = () => Object.entries(c.members).map(([n, slot]) => {
    const word = state.known.has(n) ? ` ${state.known.get(n).class_word}` : "";
    return `${n}${word} (slot ${slot})`;
  }).join(", ") || "none";
  say("collection-members", c ? `Members: ${members()}` : "");
  checkClash();
  if (!c || memberNames().every((n) => state.known.has(n))) return;
  try {
    const params = new URLSearchParams({ collection: c.name, status: "live", limit: "1000" });
    const page = await (await call("GET", `/v1/concepts?${params}`)).json();
    for (const m of page.concepts) state.known.set(m.name, m);
    if (chosenCollection() === c) say("collection-members", `Members: ${members()}`);
  } catch (_) { /* the names and slots shown are enough */ }
}

// Rows: ticked concepts not listed under Live concepts, then those listed there, in their order (rows
// do not move when one is ticked; the page never lists the whole library).
function renderPicker() {
  const listed = state.cards ? state.cards.cards.map((c) => c.name) : [];
  const names = [...new Set([...picked().map((p) => p.name).filter((n) => !listed.includes(n)), ...listed])];
  const total = state.cards ? state.cards.total : 0;
  $("picker-empty").hidden = names.length > 0 || total > 0;
  say("picker-more", total > listed.length ? "Listed: the ticked concepts and those shown under Live concepts; " +
    "type { and a name in the prompt, or find it there, for any other." : "");
  const key = JSON.stringify(names);
  if (key === state.pickerKey) return;
  state.pickerKey = key;
  const before = new Map(picked().map((p) => [p.name, p.weight]));
  $("picker").replaceChildren(...names.map((n) => pickRow(n, before.has(n), before.get(n) ?? 1)));
}

function pickRow(name, checked, weightValue) {
  const id = `pick-${[...name].map((ch) => ch.charCodeAt(0).toString(16)).join("")}`;
  const box = el("input", { type: "checkbox", id, checked, "data-name": name });
  box.addEventListener("change", checkClash);
  const weight = el("input", { type: "range", id: `${id}-w`, min: -state.weightBound, max: state.weightBound,
                               step: 0.05, value: weightValue, "data-name": name });
  const shown = el("output", { for: `${id}-w`, text: Number(weight.value).toFixed(2) });
  weight.addEventListener("input", () => { shown.textContent = Number(weight.value).toFixed(2); });
  const known = state.known.get(name);
  return el("li", { class: "pick" },
    el("label", { for: id }, box, " ", el("span", { class: "pick-name", text: name }),
       el("span", { class: "help", text: known ? ` ${known.class_word}` : "" })),
    el("label", { for: `${id}-w`, class: "visually-hidden", text: `Weight of ${name}` }),
    weight, shown);
}

function picked() {
  return [...$("picker").querySelectorAll("input[type=checkbox]:checked")].map((box) => ({
    name: box.dataset.name,
    weight: Number($("picker").querySelector(`input[type=range][data-name="${CSS.escape(box.dataset.name)}"]`).value),
  }));
}

function tick(name) {
  const box = $("picker").querySelector(`input[type=checkbox][data-name="${CSS.escape(name)}"]`);
  if (box) box.checked = true;
  else $("picker").prepend(pickRow(name, true, 1));  // a concept found by {name}: it joins the rows, ticked
  state.pickerKey = "";
  checkClash();
}

// One picture merges concepts of pairwise different slots only: say so before Generate is refused (409).
async function checkClash() {
  const names = [...new Set([...memberNames(), ...picked().map((p) => p.name)])];
  const seq = ++state.seq.clash;
  if (names.length < 2) { say("picker-clash", ""); return; }
  try {
    const answer = await (await call("GET", `/v1/mergeable?concepts=${encodeURIComponent(names.join(","))}`)).json();
    if (seq !== state.seq.clash) return;
    const problems = answer.clashes.map((c) => `${c.concepts[0]} and ${c.concepts[1]} are both in slot ${c.slot}`);
    if (answer.unknown.length) problems.push(`not live: ${answer.unknown.join(", ")}`);
    say("picker-clash", answer.mergeable ? ""
      : `One picture cannot merge these: ${problems.join("; ")}. Untick one of each pair (or choose another collection).`);
  } catch (err) {
    if (seq === state.seq.clash) say("picker-clash", err.message);
  }
}

function typedName() {
  const input = $("prompt");
  const m = /\{([A-Za-z0-9_.-]*)$/.exec(input.value.slice(0, input.selectionStart));
  return m ? m[1] : null;
}

// Live names starting with what follows the last "{": asked of the server, a few at a time.
async function suggest() {
  const typed = typedName();
  const seq = ++state.seq.suggest;
  if (typed === null) { closeSuggestions(); return; }
  const params = new URLSearchParams({ status: "live", limit: String(SUGGEST) });
  if (typed) params.set("prefix", typed);
  try {
    const page = await (await call("GET", `/v1/concepts?${params}`)).json();
    if (seq !== state.seq.suggest) return;
    for (const c of page.concepts) state.known.set(c.name, c);
    state.suggested = page.concepts.map((c) => c.name);
  } catch (_) {
    if (seq !== state.seq.suggest) return;
    state.suggested = [];
  }
  showSuggestions();
}

function showSuggestions() {
  const names = state.suggested;
  const list = $("suggestions");
  const input = $("prompt");
  if (typedName() === null || names.length === 0) { closeSuggestions(); return; }
  state.active = Math.min(Math.max(state.active, 0), names.length - 1);
  list.replaceChildren(...names.map((n, i) => {
    const option = el("li", { role: "option", id: `suggestion-${i}`, "aria-selected": String(i === state.active),
                              "data-name": n, text: `{${n}}` });
    option.addEventListener("mousedown", (e) => { e.preventDefault(); complete(n); });
    return option;
  }));
  list.hidden = false;
  input.setAttribute("aria-expanded", "true");
  input.setAttribute("aria-activedescendant", `suggestion-${state.active}`);
}

function closeSuggestions() {
  $("suggestions").hidden = true;
  $("prompt").setAttribute("aria-expanded", "false");
  $("prompt").removeAttribute("aria-activedescendant");
  state.active = -1;
}

function complete(name) {
  const input = $("prompt");
  const typed = typedName();
  if (typed === null) return;
  const start = input.selectionStart - typed.length - 1;
  const end = input.selectionStart;
  input.setRangeText(`{${name}}`, start, end, "end");
  tick(name);
  closeSuggestions();
  input.focus();
}

function onPromptKey(e) {
  if ($("suggestions").hidden) return;
  const count = $("suggestions").children.length;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    e.preventDefault();
    state.active = (state.active + (e.key === "ArrowDown" ? 1 : count - 1)) % count;
    showSuggestions();
  } else if (e.key === "Enter" || e.key === "Tab") {
    e.preventDefault();
    complete($("suggestions").children[state.active].dataset.name);
  } else if (e.key === "Escape") {
    e.preventDefault();
    closeSuggestions();
  }
}

// -- generating ------------------------------------------------------------------------------------------
function settings() {
  const body = {};
  const numbers = { seed: "seed", steps: "steps", guidance: "guidance_scale", width: "width", height: "height",
                    "num-images": "num_images" };
  for (const [id, key] of Object.entries(numbers)) {
    const v = $(id).value.trim();
    if (v !== "") body[key] = Number(v);
  }
  const negative = $("negative").value;
  if (negative) body.negative_prompt = negative;
  return body;
}

function curlLine(body) {
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  const key = state.overview && state.overview.api_key_required ? ` -H "Authorization: Bearer $BLOCKLORA_API_KEY"` : "";
  const out = (body.num_images || 1) > 1 ? "images.json" : "image.png";
  return `curl -sS -X POST '${location.origin}/v1/generate' -H 'Content-Type: application/json'${key} -d '${json}' -o ${out}`;
}

// One /v1/generate call: [{url, seed, version}], whether the answer was one PNG or JSON with several.
async function draw(body) {
  const r = await call("POST", "/v1/generate", { json: body, secret: apiKey() });
  if ((r.headers.get("Content-Type") || "").startsWith("image/png")) {
    return [{ url: URL.createObjectURL(await r.blob()), seed: Number(r.headers.get("X-BlockLoRA-Seed")),
              version: Number(r.headers.get("X-BlockLoRA-Version")) }];
  }
  const data = await r.json();
  return data.images.map((b64, j) => {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return { url: URL.createObjectURL(new Blob([bytes], { type: "image/png" })), seed: data.seeds[j], version: data.version };
  });
}

function figure(title, image, body) {
  const img = el("img", { src: image.url, alt: `${title}, seed ${image.seed}` });
  img.addEventListener("load", () => { if (img.naturalWidth < 256) img.classList.add("pixelated"); });
  const copy = el("button", { type: "button", class: "small", text: "curl" });
  copy.setAttribute("aria-label", `Show ${title} as a curl command`);
  copy.addEventListener("click", () => showCurl(body));
  return el("figure", { class: "result", "data-version": String(image.version), "data-seed": String(image.seed) },
    img, el("figcaption", {}, el("span", { class: "result-title", text: title }),
                          el("span", { class: "result-meta", text: `version ${image.version} · seed ${image.seed}` }),
                          copy));
}

function showCurl(body) {
  $("curl-box").hidden = false;
  $("curl").value = curlLine(body);
}

async function run(cells) {
  say("generate-error", "");
  const prompt = $("prompt").value;
  if (!prompt.trim()) { say("generate-error", "Write a prompt first."); $("prompt").focus(); return; }
  const buttons = [$("generate-button"), $("compare-button")];
  buttons.forEach((b) => { b.disabled = true; });
  say("generate-status", cells.length > 1 ? `Drawing ${cells.length} pictures side by side…` : "Drawing…");
  const started = performance.now();
  try {
    const answers = await Promise.allSettled(cells.map((c) => draw(c.body)));  // in flight together: one batch
    const figures = [];
    const errors = [];
    answers.forEach((a, i) => {
      if (a.status === "fulfilled") a.value.forEach((image) => figures.push(figure(cells[i].title, image, cells[i].body)));
      else errors.push(cells.length > 1 ? `${cells[i].title}: ${a.reason.message}` : a.reason.message);
    });
    $("results").replaceChildren(...figures);
    state.resultsVersion = figures.length ? Number(figures[0].dataset.version) : null;
    noteStaleResults();
    $("results").classList.toggle("compare", cells.length > 1);
    showCurl(cells[cells.length - 1].body);
    say("generate-error", errors.join("\n"));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    say("generate-status", figures.length ? `${figures.length} picture(s) in ${seconds} s.` : "");
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

function generate(e) {
  e.preventDefault();
  const concepts = picked();
  const collection = $("collection").value;
  const body = { prompt: $("prompt").value, concepts, ...(collection ? { collection } : {}), ...settings() };
  const parts = [...(collection ? [`collection ${collection}`] : []), ...concepts.map((c) => `${c.name} ×${c.weight}`)];
  run([{ title: parts.length ? parts.join(" + ") : "no concept ticked", body }]);
}

// Side by side: no concept, each concept alone, all merged — same prompt, same seed, one image each.
// With a collection: its members count as ticked (weight 1 unless ticked with another), and "all merged"
// names the collection, as a request of the API would.
function compare() {
  const ticked = picked();
  const collection = $("collection").value;
  const weights = new Map(memberNames().map((n) => [n, 1]));
  for (const c of ticked) weights.set(c.name, c.weight);
  const concepts = [...weights].map(([name, weight]) => ({ name, weight }));
  if (concepts.length === 0) {
    say("generate-error", "Tick at least one concept (or choose a collection) to compare.");
    return;
  }
  const prompt = $("prompt").value;
  const only = (names) => prompt.replace(/\{([A-Za-z0-9_.-]+)\}/g, (whole, n) =>
    names.includes(n) || !state.known.has(n) ? whole : state.known.get(n).class_word);
  const base = { ...settings(), num_images: 1 };
  const cell = (title, chosen, extra) => ({ title, body: { ...base, prompt: only(chosen.map((c) => c.name)),
                                                           concepts: extra ? ticked : chosen, ...extra } });
  const cells = [cell("no concept", []), ...concepts.map((c) => cell(`${c.name} alone`, [c]))];
  if (concepts.length > 1) cells.push(cell("all merged", concepts, collection ? { collection } : null));
  run(cells);
}

// -- add and remove ----------------------------------------------------------------------------------------
function token() {
  const t = $("token").value.trim();
  if (!t) {
    say("manage-error", "Enter a client or admin token first.");
    $("token").focus();
  }
  return t;
}

async function upload(e) {
  e.preventDefault();
  say("manage-error", ""); say("manage-status", "");
  const file = $("artifact").files[0];
  if (!file) { say("manage-error", "Choose an artifact file first."); $("artifact").focus(); return; }
  const secret = token();
  if (!secret) return;
  say("manage-status", `Uploading ${file.name}…`);
  try {
    const live = await (await call("POST", "/v1/concepts", { body: file, secret })).json();
    say("manage-status", `${live.name} is live in slot ${live.slot} (version ${live.version}).`);
    $("artifact").value = "";
    await refresh();
  } catch (err) {
    say("manage-status", "");
    say("manage-error", err.message);
  }
}

async function removeConcept(name) {
  say("manage-error", ""); say("manage-status", "");
  const secret = token();
  if (!secret) { $("manage").scrollIntoView(); return; }
  if (!window.confirm(`Remove ${name} from the federation? Requests naming it will be refused.`)) return;
  try {
    const removed = await (await call("DELETE", `/v1/concepts/${encodeURIComponent(name)}`, { secret })).json();
    say("manage-status", `${removed.name} removed (version ${removed.version}).`);
    state.known.delete(name);
    const row = $("picker").querySelector(`input[type=checkbox][data-name="${CSS.escape(name)}"]`);
    if (row) row.closest("li").remove();
    await refresh();
  } catch (err) {
    say("manage-error", err.message);
    $("manage").scrollIntoView();
  }
}

// -- start ---------------------------------------------------------------------------------------------------
async function start() {
  $("prompt").addEventListener("input", suggest);
  $("prompt").addEventListener("keydown", onPromptKey);
  $("prompt").addEventListener("blur", closeSuggestions);
  $("generate-form").addEventListener("submit", generate);
  $("compare-button").addEventListener("click", compare);
  $("upload-form").addEventListener("submit", upload);
  $("collection").addEventListener("change", showMembers);
  $("cards-more").addEventListener("click", () => loadCards(true));
  let typing = null;  // the filter asks once typing pauses
  $("cards-filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => loadCards(false), 250);
  });
  $("api-key").addEventListener("change", () => {  // thumbnails need the key where the server wants one
    state.cardsKey = "";
    renderCards();
  });
  $("copy-curl").addEventListener("click", async () => {
    $("curl").select();
    try { await navigator.clipboard.writeText($("curl").value); say("generate-status", "curl command copied."); }
    catch (_) { say("generate-status", "Select the curl command and copy it (the browser refused the clipboard)."); }
  });
  try { await loadBounds(); } catch (err) { say("generate-error", `Could not read the API's bounds: ${err.message}`); }
  await refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
