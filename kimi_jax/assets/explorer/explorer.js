/* kimi-jax ledger explorer.
 *
 * Everything shown comes from the embedded ledger (script#ledger-data). Every text taken from
 * the ledger goes into the page through textContent / createTextNode, never through HTML
 * parsing. Provenance classes come from PROVENANCE (the schema's x-provenance), looked up by
 * the field's schema path, e.g. "steps[].layers[].norm_in".
 */
(function () {
  const RAW = JSON.parse(document.getElementById("ledger-data").textContent);
  // A multi-sequence ledger (version 3) is shown one sequence at a time, as the version-2 ledger
  // of its own run (kimi_jax.ledger.sequences.sequence_view); the selector names it in this page's
  // own URL fragment and reloads this same page, which reads nothing but this file.
  const SEQUENCE = RAW.sequences ? chosenSequence(RAW.sequences.length) : null;
  const LEDGER = RAW.sequences ? sequenceView(RAW, SEQUENCE) : RAW;
  const STEPS = LEDGER.steps;

  function chosenSequence(count) {
    const found = /#(?:.*&)?sequence=(\d+)/.exec(document.URL);
    const n = found ? Number(found[1]) : 0;
    return n < count ? n : 0;
  }

  function sequenceView(ledger, i) {
    const seq = ledger.sequences[i];
    const view = {};
    for (const [k, v] of Object.entries(ledger)) if (k !== "sequences" && k !== "passes" && k !== "totals") view[k] = v;
    view.run = Object.assign({}, ledger.run);
    for (const k of ["prompt", "prompt_input", "sampling", "stop"]) view.run[k] = seq[k];
    for (const k of ["steps", "stopped", "text", "anchor", "non_perturbation"]) if (k in seq) view[k] = seq[k];
    view.totals = seq.totals;
    return view;
  }

  function renderSequenceSelect() {
    const box = document.getElementById("sequence-box");
    if (!RAW.sequences) return;
    box.hidden = false;
    const select = document.getElementById("sequence-select");
    RAW.sequences.forEach((seq, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = "sequence " + i + " (" + seq.steps.length + " tokens, " + seq.stopped.reason + ")";
      option.selected = i === SEQUENCE;
      select.appendChild(option);
    });
    select.addEventListener("change", (e) => {
      history.replaceState(null, "", "#sequence=" + e.target.value);
      history.go(0);
    });
    const t = RAW.totals;
    document.getElementById("sequence-summary").textContent = RAW.sequences.length + " sequences in " +
      RAW.passes.length + " passes over the weights: " + groupInt(Math.round(t.bytes_used_per_token)) +
      " bytes used and " + groupInt(Math.round(t.bytes_from_storage_per_token)) + " read from storage per token";
  }
  const HAS = Object.prototype.hasOwnProperty;
  const STEP_COLORS = ["#d95f02", "#7570b3", "#e7298a", "#a6761d", "#4d4d4d", "#e6ab02", "#b15928", "#6a3d9a",
    "#c51b7d", "#8c510a", "#66a61e", "#1b9e77"];

  // -- provenance ------------------------------------------------------------------------------

  /** The class (measured, derived or null) of a schema path; an unclassified path inherits from the
   *  nearest classified ancestor (e.g. platform.backend from platform), as in unclassified_fields. */
  function provOf(path) {
    let p = path;
    while (p) {
      if (HAS.call(PROVENANCE, p)) return PROVENANCE[p];
      const m = /^(.*?)(\[\]|\.[^.[\]]+)$/.exec(p);
      if (!m) break;
      p = m[1];
    }
    return null;
  }

  function provClass(path) {
    const p = provOf(path);
    if (!p) document.getElementById("legend-unclassified").hidden = false;
    return "prov-" + (p || "unclassified");
  }

  function mark(node, path) {
    node.classList.add(provClass(path));
    node.dataset.path = path;
    node.dataset.prov = provOf(path) || "unclassified";
    node.title = path + ": " + node.dataset.prov;
    return node;
  }

  function badge(id, paths) {
    const node = document.getElementById(id);
    node.textContent = "";
    for (const path of paths) {
      const b = mark(document.createElement("span"), path);
      b.classList.add("badge");
      b.textContent = path.replace(/^steps\[\]\./, "") + " · " + (provOf(path) || "unclassified");
      node.appendChild(b);
    }
  }

  // -- formatting (no rounding: the ledger's numbers are shown as written) -----------------------

  function groupInt(n) {
    return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  function fmt(value, kind) {
    if (value === undefined) return "–";
    if (value === null) return "null";
    if (Array.isArray(value)) return value.map((v) => fmt(v, kind)).join(", ");
    if (kind === "bytes" && typeof value === "number") return groupInt(value);
    // token_bytes is hex: shown byte by byte as \xNN, so "2373" cannot be read as a number
    if (kind === "hex" && typeof value === "string") return value.replace(/[0-9a-f]{2}/g, "\\x$&");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // -- DOM helpers -------------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.appendChild(document.createTextNode(text));
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  /** A table cell holding one ledger value, with its provenance class (absent values get none). */
  function valueCell(path, value, kind, tag) {
    const td = el(tag || "td", kind === "bytes" || kind === "num" ? "num" : kind === "ids" ? "ids" :
      kind === "text" ? "text" : "");
    td.textContent = fmt(value, kind);
    if (value === undefined) {
      td.classList.add("absent");
      td.title = path + ": absent from the ledger";
    } else {
      mark(td, path);
    }
    return td;
  }

  function headRow(thead, labels) {
    const tr = el("tr");
    for (const label of labels) tr.appendChild(el("th", "", label));
    clear(thead).appendChild(tr);
    return tr;
  }

  function clickable(tr, onSelect) {
    tr.classList.add("clickable");
    tr.tabIndex = 0;
    tr.addEventListener("click", onSelect);
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        onSelect();
      }
    });
  }

  // -- ledger shape ------------------------------------------------------------------------------

  const NUM_LAYERS = STEPS.reduce((n, s) => Math.max(n, s.layers.length), 0);
  let MAX_EXPERT = -1;
  let MAX_WEIGHT = 0;
  for (const s of STEPS) {
    for (const l of s.layers) {
      for (const row of l.experts || []) for (const e of row) MAX_EXPERT = Math.max(MAX_EXPERT, e);
      for (const row of l.routing_weights || []) for (const w of row) MAX_WEIGHT = Math.max(MAX_WEIGHT, w);
    }
  }
  const NUM_EXPERT_COLUMNS = MAX_EXPERT + 1;

  /** Rows of the per-position routing lists in a step (the positions of its forward pass). */
  function positionsOf(step) {
    let t = 0;
    for (const l of step.layers) if (l.experts) t = Math.max(t, l.experts.length);
    return t;
  }

  /** Absolute position in the context of row p of a forward pass covering the last t positions. */
  function absolutePosition(step, t, p) {
    return step.context.length - t + p;
  }

  function layerByIndex(step, index) {
    for (const l of step.layers) if (l.layer === index) return l;
    return undefined;
  }

  // -- token texts -------------------------------------------------------------------------------

  /** id -> text, from every text the ledger holds (prompt tokens, output tokens, top-k alternatives). */
  const TOKEN_TEXTS = new Map();
  function learn(id, text) {
    if (typeof text === "string" && !TOKEN_TEXTS.has(id)) TOKEN_TEXTS.set(id, text);
  }
  const TEXT = LEDGER.text || null;
  if (TEXT) (LEDGER.run.prompt || []).forEach((id, i) => learn(id, (TEXT.prompt_token_texts || [])[i]));
  for (const s of STEPS) {
    learn(s.token, s.token_text);
    (s.top_k || []).forEach((pair, j) => learn(pair[0], (s.top_k_text || [])[j]));
  }

  /** A token's text, quoted (JSON escapes make spaces, newlines and control characters visible). */
  function quoted(id) {
    return TOKEN_TEXTS.has(id) ? JSON.stringify(TOKEN_TEXTS.get(id)) : undefined;
  }

  /** The texts of a list of ids, each quoted, space separated. */
  function quotedAll(ids) {
    return ids.every((id) => TOKEN_TEXTS.has(id)) ? ids.map(quoted).join(" ") : undefined;
  }

  // -- state -------------------------------------------------------------------------------------

  const state = { step: STEPS.length - 1, pos: 0, layer: 0, normField: "norm_out" };
  const firstMoe = STEPS[0].layers.find((l) => l.experts);
  state.layer = firstMoe ? firstMoe.layer : (STEPS[0].layers[0] || { layer: 0 }).layer;
  state.step = 0;
  state.pos = Math.max(positionsOf(STEPS[0]) - 1, 0);
  const charts = {};

  // -- headline ----------------------------------------------------------------------------------

  function get(obj, dotted) {
    let v = obj;
    for (const k of dotted.split(".")) {
      if (v === null || v === undefined) return v;
      v = v[k];
    }
    return v;
  }

  function renderHeadline() {
    const anchor = LEDGER.anchor;
    const np = LEDGER.non_perturbation;
    const run = [
      ["model layout", "checkpoint.layout"],
      ["checkpoint", "checkpoint.path"],
      ["compute dtype", "run.dtype"],
      ["dequantization", "run.dequant"],
      ["prompt", "run.prompt", "ids"],
      ["max_new_tokens", "run.max_new_tokens"],
      ["kv_cache", "run.kv_cache"],
      ["capture", "run.capture"],
      ["page cache evicted", "run.page_cache_evicted"],
      ["page cache resident bytes", "run.page_cache_resident_bytes", "bytes"],
      ["shard bytes", "run.shard_bytes", "bytes"],
      ["total bytes read", "totals.bytes_read", "bytes"],
      ["total wall s", "totals.wall_s"],
      ["of which compiling s", "totals.compile_s"],
      ["proof's bare pass wall s", "totals.proof_wall_s"],
      ["whole run wall s", "totals.run_wall_s"],
    ];
    const digests = [
      ["manifest digest", "manifest_digest"],
      ["platform digest", "platform_digest"],
      ["config digest", "checkpoint.config_digest"],
      ["tensor list digest", "checkpoint.tensor_list_digest"],
      ["anchor status", "anchor.status", null, anchor ? anchor.status : null],
      ["anchor file", "anchor.file", null, anchor ? anchor.file : null],
      ["anchor digest", "anchor.anchor_digest", null, anchor ? anchor.anchor_digest : null],
      ["non-perturbation identical", "non_perturbation.identical", null, np ? np.identical : null],
      ["non-perturbation scope", "non_perturbation.scope", null, np ? np.scope : null],
      ["non-perturbation compared", "non_perturbation.compared", null, np ? np.compared : null],
      ["backend", "platform.backend"],
      ["device kind", "platform.device_kind"],
      ["schema", "schema"],
      ["ledger version", "ledger_version"],
      ["software", "software", null, Object.entries(LEDGER.software || {}).map(([k, v]) => k + " " + v)],
    ];
    const fill = (tbodyParent, rows) => {
      const tbody = clear(tbodyParent.tBodies[0]);
      for (const [label, path, kind, given] of rows) {
        const value = given !== undefined ? given : get(LEDGER, path);
        const tr = el("tr");
        const th = el("th", "", label);
        th.appendChild(el("div", "muted mono", path));
        tr.appendChild(th);
        const td = valueCell(path, value, kind);
        td.classList.add("val");
        td.id = "headline-" + path.replace(/[^a-z0-9_]+/gi, "-");
        tr.appendChild(td);
        tbody.appendChild(tr);
      }
    };
    fill(document.getElementById("headline-run"), run);
    renderText();
    fill(document.getElementById("headline-digests"), digests);
    const ptable = clear(document.getElementById("platform-table"));
    for (const [k, v] of Object.entries(LEDGER.platform || {})) {
      const tr = el("tr");
      tr.appendChild(el("th", "mono", k));
      tr.appendChild(valueCell("platform." + k, v));
      ptable.appendChild(tr);
    }
  }

  // -- text ---------------------------------------------------------------------------------------

  function promptAsGiven(given) {
    if (!given || typeof given !== "object") return given;
    if (typeof given.text === "string") return given.text;
    if (Array.isArray(given.chat)) return given.chat.map((m) => String(m.role) + ": " + String(m.content)).join("\n");
    return given.tokens;
  }

  function renderText() {
    const stopped = LEDGER.stopped;
    const tok = LEDGER.checkpoint.tokenizer;
    const rows = [
      ["prompt as given", "run.prompt_input", promptAsGiven(LEDGER.run.prompt_input)],
      ["prompt text", "text.prompt_text", TEXT ? TEXT.prompt_text : undefined],
      ["generated text", "text.generated_text", TEXT ? TEXT.generated_text : undefined],
      ["stopped", "stopped.reason", stopped ? [stopped.reason, ...["token", "string"].filter((k) => HAS.call(stopped, k))
        .map((k) => k + " " + JSON.stringify(stopped[k]))].join(", ") : undefined],
      ["sampling", "run.sampling", LEDGER.run.sampling === null ? "greedy" : LEDGER.run.sampling],
      ["tokenizer", "checkpoint.tokenizer.digest", tok ? tok.kind + " " + tok.digest : undefined],
    ];
    const tbody = clear(document.getElementById("text-table").tBodies[0]);
    for (const [label, path, value] of rows) {
      const tr = el("tr");
      const th = el("th", "", label);
      th.appendChild(el("div", "muted mono", path));
      tr.appendChild(th);
      const td = valueCell(path, value, "text");
      td.dataset.field = path;
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    document.getElementById("text").hidden = !(TEXT || LEDGER.run.prompt_input || stopped);
  }

  // -- timeline ----------------------------------------------------------------------------------

  const HAS_TEXT = STEPS.some((s) => HAS.call(s, "token_text"));
  const TIMELINE_COLUMNS = [
    ["step", "index"], ["context", "context", "ids"], ["token", "token"],
    ...(HAS_TEXT ? [["token_text", "token_text", "text"]] : []),
    ["logit", "logit", "num"], ["probability", "probability", "num"], ["rank", "rank", "num"],
    ["margin", "margin", "num"], ["entropy", "entropy", "num"],
    ["bytes_read", "bytes_read", "bytes"], ["wall_s", "wall_s", "num"],
  ];

  function renderTimeline() {
    const table = document.getElementById("timeline-table");
    headRow(table.tHead, TIMELINE_COLUMNS.map((c) => c[0]));
    const tbody = clear(table.tBodies[0]);
    STEPS.forEach((step, i) => {
      const tr = el("tr");
      tr.dataset.step = String(i);
      for (const [, key, kind] of TIMELINE_COLUMNS) {
        const td = valueCell("steps[]." + key, step[key], kind);
        td.dataset.field = key;
        tr.appendChild(td);
      }
      clickable(tr, () => selectStep(i));
      tbody.appendChild(tr);
    });
  }

  // -- selected step detail ----------------------------------------------------------------------

  function renderStepDetail() {
    const step = STEPS[state.step];
    document.getElementById("step-detail-title").textContent = "Step " + step.index;
    const tbody = clear(document.getElementById("step-fields").tBodies[0]);
    const fields = [["index"], ["token"], ...(HAS_TEXT ? [["token_text", "text"], ["token_bytes", "hex"]] : []),
      ["logit", "num"], ["probability", "num"], ["rank", "num"], ["sampling"], ["margin", "num"], ["entropy", "num"],
      ["hidden_digest"], ["logits_digest"], ["bytes_read", "bytes"], ["wall_s", "num"], ["compile_s", "num"],
      ["context", "ids"]];
    for (const [key, kind] of fields) {
      const tr = el("tr");
      tr.appendChild(el("th", "mono", key));
      const td = valueCell("steps[]." + key, step[key], kind);
      td.classList.add("val");
      td.dataset.field = key;
      if (key.endsWith("_digest") || key === "token_bytes") td.classList.add("mono");
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    const contextText = quotedAll(step.context);
    if (contextText !== undefined) {
      const tr = el("tr");
      tr.appendChild(el("th", "mono", "context as text"));
      const td = mark(el("td", "text val", contextText), "text.prompt_token_texts");
      td.title = "the text of each context id (text.prompt_token_texts, steps[].token_text): derived";
      td.dataset.field = "context_text";
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    const topk = document.getElementById("topk-table");
    const topText = Array.isArray(step.top_k_text);
    headRow(topk.tHead, ["token", "logit", ...(topText ? ["text"] : [])]);
    const tb = clear(topk.tBodies[0]);
    (step.top_k || []).forEach(([token, logit], j) => {
      const tr = el("tr");
      const id = valueCell("steps[].top_k", token, "num");
      id.dataset.field = "token";
      tr.appendChild(id);
      const value = valueCell("steps[].top_k", logit, "num");
      value.dataset.field = "logit";
      tr.appendChild(value);
      if (topText) {
        const text = valueCell("steps[].top_k_text", step.top_k_text[j], "text");
        text.dataset.field = "text";
        tr.appendChild(text);
      }
      tb.appendChild(tr);
    });
    if (!step.top_k) {
      const tr = el("tr");
      tr.appendChild(el("td", "absent", "top_k absent from the ledger"));
      tb.appendChild(tr);
    }
  }

  // -- norm trajectory chart ---------------------------------------------------------------------

  function normDatasets() {
    return STEPS.map((step, i) => {
      const data = [];
      for (let L = 0; L < NUM_LAYERS; L++) {
        const l = layerByIndex(step, L);
        data.push(l && typeof l[state.normField] === "number" ? l[state.normField] : null);
      }
      const selected = i === state.step;
      return {
        label: "step " + step.index + " (token " + step.token + (quoted(step.token) ? " " + quoted(step.token) : "") + ")",
        data,
        borderColor: STEP_COLORS[i % STEP_COLORS.length],
        backgroundColor: STEP_COLORS[i % STEP_COLORS.length],
        borderWidth: selected ? 3.5 : 1.25,
        pointRadius: selected ? 3 : 1.5,
        spanGaps: false,
      };
    });
  }

  function makeNormChart() {
    const labels = [];
    for (let L = 0; L < NUM_LAYERS; L++) labels.push(String(L));
    charts.norm = new Chart(document.getElementById("norm-chart"), {
      type: "line",
      data: { labels, datasets: normDatasets() },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, normalized: true,
        interaction: { mode: "nearest", intersect: false },
        scales: {
          x: { title: { display: true, text: "layer" } },
          y: { title: { display: true, text: "" } },
        },
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: {
            callbacks: {
              label: (ctx) => ctx.dataset.label + ": " + state.normField + " " + String(ctx.raw) + " (" +
                provOf("steps[].layers[]." + state.normField) + ")",
            },
          },
        },
        onClick: (evt, elements) => {
          if (elements.length) selectStep(elements[0].datasetIndex);
        },
      },
    });
    updateNormChart();
  }

  function updateNormChart() {
    const chart = charts.norm;
    const fresh = normDatasets();
    chart.data.datasets.forEach((ds, i) => Object.assign(ds, fresh[i]));
    chart.options.scales.y.title.text = state.normField;
    chart.update("none");
    badge("norm-badge", ["steps[].layers[]." + state.normField]);
  }

  // -- layer table -------------------------------------------------------------------------------

  const LAYER_COLUMNS = [["layer", "layer"], ["kind", "kind"], ["norm_in", "norm_in", "num"],
    ["norm_out", "norm_out", "num"], ["experts", "experts", "ids", true],
    ["routing_weights", "routing_weights", "ids", true], ["router_scores", "router_scores", "ids", true],
    ["bytes_read", "bytes_read", "bytes"]];

  function renderLayerTable() {
    const step = STEPS[state.step];
    const t = positionsOf(step);
    const title = document.getElementById("layers-title");
    title.textContent = "Layers of step " + step.index + (t ? " · position " + absolutePosition(step, t, state.pos) : "");
    const table = document.getElementById("layer-table");
    headRow(table.tHead, LAYER_COLUMNS.map((c) => c[0]));
    const tbody = clear(table.tBodies[0]);
    for (const l of step.layers) {
      const tr = el("tr");
      tr.dataset.layer = String(l.layer);
      for (const [, key, kind, perPosition] of LAYER_COLUMNS) {
        let value = l[key];
        if (perPosition && value !== undefined) value = value[state.pos];
        const td = valueCell("steps[].layers[]." + key, value, kind);
        td.dataset.field = key;
        tr.appendChild(td);
      }
      if (l.layer === state.layer) tr.classList.add("selected");
      clickable(tr, () => selectLayer(l.layer));
      tbody.appendChild(tr);
    }
  }

  // -- routing panel -----------------------------------------------------------------------------

  function renderPositionSelect() {
    const step = STEPS[state.step];
    const t = positionsOf(step);
    const select = clear(document.getElementById("position-select"));
    select.disabled = t === 0;
    for (let p = 0; p < t; p++) {
      const abs = absolutePosition(step, t, p);
      const id = abs >= 0 && abs < step.context.length ? step.context[abs] : undefined;
      const text = id === undefined ? undefined : quoted(id);
      const option = el("option", "", String(abs) + (id !== undefined ?
        " (context token " + id + (text !== undefined ? " " + text : "") + ")" : ""));
      option.value = String(p);
      select.appendChild(option);
    }
    if (t) select.value = String(state.pos);
  }

  function heatmapData() {
    const step = STEPS[state.step];
    const data = [];
    for (const l of step.layers) {
      if (!l.experts || !l.experts[state.pos]) continue;
      const experts = l.experts[state.pos];
      const weights = (l.routing_weights || [])[state.pos] || [];
      const scores = (l.router_scores || [])[state.pos] || [];
      experts.forEach((e, j) => data.push({ x: e, y: l.layer, v: weights[j], s: scores[j] }));
    }
    return data;
  }

  function weightColor(v) {
    if (typeof v !== "number" || !(MAX_WEIGHT > 0)) return "rgba(120,120,120,0.6)";
    const a = Math.max(0.12, Math.min(1, v / MAX_WEIGHT));
    return "rgba(150, 40, 120, " + a.toFixed(3) + ")";
  }

  const gridBackground = {
    id: "gridBackground",
    beforeDatasetsDraw(chart) {
      const { ctx, chartArea } = chart;
      if (!chartArea) return;
      ctx.save();
      ctx.fillStyle = "#f4f5f7";
      ctx.fillRect(chartArea.left, chartArea.top, chartArea.width, chartArea.height);
      const y = chart.scales.y;
      const top = y.getPixelForValue(state.layer - 0.5);
      const bottom = y.getPixelForValue(state.layer + 0.5);
      ctx.fillStyle = "rgba(0,0,0,0.08)";
      ctx.fillRect(chartArea.left, Math.min(top, bottom), chartArea.width, Math.abs(bottom - top));
      ctx.restore();
    },
  };

  function integerTick(value) {
    return Number.isInteger(value) ? String(value) : "";
  }

  /** Ticks on whole numbers only (the heat map's axes run from -0.5 so cells centre on ids). */
  function integerTicks(count, most) {
    return (axis) => {
      const step = Math.max(1, Math.ceil(count / most));
      const ticks = [];
      for (let v = 0; v < count; v += step) ticks.push({ value: v });
      axis.ticks = ticks;
    };
  }

  function makeHeatmap() {
    const box = document.getElementById("heatmap-box");
    box.style.height = Math.max(220, Math.min(900, NUM_LAYERS * 10 + 90)) + "px";
    const note = document.getElementById("heatmap-note");
    note.textContent = NUM_EXPERT_COLUMNS > 0 ?
      "columns: expert ids 0 to " + MAX_EXPERT + " (the largest id in this ledger); colour: routing_weights, 0 to " +
        String(MAX_WEIGHT) + " (the largest in this ledger); click a cell to select its layer" :
      "no routing in this ledger";
    charts.heatmap = new Chart(document.getElementById("routing-heatmap"), {
      type: "matrix",
      data: {
        datasets: [{
          label: "routing_weights",
          data: heatmapData(),
          backgroundColor: (ctx) => weightColor(ctx.raw && ctx.raw.v),
          borderColor: (ctx) => (ctx.raw && ctx.raw.y === state.layer ? "#111" : "rgba(0,0,0,0)"),
          borderWidth: 1,
          width: ({ chart }) => Math.max(1, (chart.chartArea || {}).width / Math.max(1, NUM_EXPERT_COLUMNS)),
          height: ({ chart }) => Math.max(1, (chart.chartArea || {}).height / Math.max(1, NUM_LAYERS)),
        }],
      },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        scales: {
          x: { type: "linear", offset: false, min: -0.5, max: Math.max(0, MAX_EXPERT) + 0.5,
            title: { display: true, text: "expert id" }, ticks: { callback: integerTick, autoSkip: false },
            afterBuildTicks: integerTicks(NUM_EXPERT_COLUMNS, 24), grid: { display: false } },
          y: { type: "linear", reverse: true, offset: false, min: -0.5, max: Math.max(0, NUM_LAYERS - 1) + 0.5,
            title: { display: true, text: "layer" }, ticks: { callback: integerTick, autoSkip: false },
            afterBuildTicks: integerTicks(NUM_LAYERS, 32),
            grid: { display: false } },
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? "layer " + items[0].raw.y + ", expert " + items[0].raw.x : ""),
              label: (ctx) => [
                "routing_weights " + String(ctx.raw.v) + " (" + provOf("steps[].layers[].routing_weights") + ")",
                "router_scores " + String(ctx.raw.s) + " (" + provOf("steps[].layers[].router_scores") + ")",
              ],
            },
          },
        },
        onClick: (evt, elements) => {
          if (elements.length) selectLayer(charts.heatmap.data.datasets[0].data[elements[0].index].y);
        },
      },
      plugins: [gridBackground],
    });
    badge("routing-badge", ["steps[].layers[].experts", "steps[].layers[].routing_weights",
      "steps[].layers[].router_scores"]);
  }

  function updateHeatmap() {
    charts.heatmap.data.datasets[0].data = heatmapData();
    charts.heatmap.update("none");
  }

  function renderRoutingDetail() {
    const step = STEPS[state.step];
    const l = layerByIndex(step, state.layer);
    const t = positionsOf(step);
    const title = document.getElementById("routing-detail-title");
    title.textContent = "Layer " + state.layer + (l ? " (" + l.kind + ")" : "") + ", step " + step.index +
      (t ? ", position " + absolutePosition(step, t, state.pos) : "");
    const list = clear(document.getElementById("routing-selected"));
    const table = document.getElementById("routing-detail-table");
    const tbody = clear(table.tBodies[0]);
    if (!l || !l.experts) {
      headRow(table.tHead, ["position"]);
      list.appendChild(el("li", "muted", "no routed experts recorded for this layer"));
      return;
    }
    const experts = l.experts[state.pos] || [];
    const weights = (l.routing_weights || [])[state.pos] || [];
    const scores = (l.router_scores || [])[state.pos] || [];
    experts.forEach((e, j) => {
      const li = el("li", "");
      li.dataset.expert = String(e);
      const ex = mark(el("span", "", "expert " + String(e)), "steps[].layers[].experts");
      li.appendChild(ex);
      li.appendChild(document.createTextNode(" "));
      li.appendChild(mark(el("span", "", "w " + fmt(weights[j])), "steps[].layers[].routing_weights"));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(mark(el("span", "", "s " + fmt(scores[j])), "steps[].layers[].router_scores"));
      list.appendChild(li);
    });
    headRow(table.tHead, ["position", "experts", "routing_weights", "router_scores"]);
    l.experts.forEach((row, p) => {
      const tr = el("tr");
      if (p === state.pos) tr.classList.add("selected");
      tr.appendChild(el("td", "num", String(absolutePosition(step, t, p))));
      tr.appendChild(valueCell("steps[].layers[].experts", row, "ids"));
      tr.appendChild(valueCell("steps[].layers[].routing_weights", (l.routing_weights || [])[p], "ids"));
      tr.appendChild(valueCell("steps[].layers[].router_scores", (l.router_scores || [])[p], "ids"));
      clickable(tr, () => selectPosition(p));
      tbody.appendChild(tr);
    });
  }

  // -- byte accounting ---------------------------------------------------------------------------

  function bytesData() {
    const step = STEPS[state.step];
    const data = [];
    for (let L = 0; L < NUM_LAYERS; L++) {
      const l = layerByIndex(step, L);
      data.push(l ? l.bytes_read : null);
    }
    return data;
  }

  function makeBytesChart() {
    const labels = [];
    for (let L = 0; L < NUM_LAYERS; L++) labels.push(String(L));
    charts.bytes = new Chart(document.getElementById("bytes-chart"), {
      type: "bar",
      data: { labels, datasets: [{ label: "bytes_read", data: bytesData(), backgroundColor: "#8c6d31" }] },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        scales: { x: { title: { display: true, text: "layer" } }, y: { title: { display: true, text: "bytes_read" } } },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (ctx) => "bytes_read " + groupInt(ctx.raw) + " (" +
            provOf("steps[].layers[].bytes_read") + ")" } },
        },
        onClick: (evt, elements) => {
          if (elements.length) selectLayer(elements[0].index);
        },
      },
    });
    badge("bytes-badge", ["steps[].layers[].bytes_read", "steps[].bytes_read"]);
  }

  function renderBytesTable() {
    const table = document.getElementById("bytes-table");
    const head = headRow(table.tHead, ["layer", "kind"]);
    STEPS.forEach((step, i) => {
      const th = el("th", "clickable", "step " + step.index);
      th.dataset.step = String(i);
      th.addEventListener("click", () => selectStep(i));
      head.appendChild(th);
    });
    const tbody = clear(table.tBodies[0]);
    for (let L = 0; L < NUM_LAYERS; L++) {
      const tr = el("tr");
      tr.dataset.layer = String(L);
      const first = layerByIndex(STEPS[0], L);
      tr.appendChild(valueCell("steps[].layers[].layer", L, "num"));
      tr.appendChild(valueCell("steps[].layers[].kind", first ? first.kind : undefined));
      STEPS.forEach((step, i) => {
        const l = layerByIndex(step, L);
        const td = valueCell("steps[].layers[].bytes_read", l ? l.bytes_read : undefined, "bytes");
        td.dataset.step = String(i);
        tr.appendChild(td);
      });
      clickable(tr, () => selectLayer(L));
      tbody.appendChild(tr);
    }
    const foot = clear(table.tFoot);
    const tr = el("tr");
    const th = el("th", "", "step bytes_read");
    th.colSpan = 2;
    th.appendChild(el("div", "muted mono", "steps[].bytes_read (all layers, embedding rows and head)"));
    tr.appendChild(th);
    STEPS.forEach((step, i) => {
      const td = valueCell("steps[].bytes_read", step.bytes_read, "bytes");
      td.dataset.step = String(i);
      tr.appendChild(td);
    });
    foot.appendChild(tr);
  }

  function updateBytes() {
    charts.bytes.data.datasets[0].data = bytesData();
    charts.bytes.data.datasets[0].backgroundColor = bytesData().map((_, L) => (L === state.layer ? "#4a3510" : "#b39b6b"));
    charts.bytes.options.scales.y.title.text = "bytes_read, step " + STEPS[state.step].index;
    charts.bytes.update("none");
    const table = document.getElementById("bytes-table");
    for (const node of table.querySelectorAll("[data-step]")) {
      node.classList.toggle(node.tagName === "TH" ? "selected" : "selected-col", node.dataset.step === String(state.step));
    }
    for (const tr of table.tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.layer === String(state.layer));
  }

  // -- selection ---------------------------------------------------------------------------------

  function renderSelection() {
    const step = STEPS[state.step];
    for (const tr of document.getElementById("timeline-table").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.dataset.step === String(state.step));
    }
    const t = positionsOf(step);
    document.getElementById("selection-summary").textContent = "selected: step " + step.index + ", layer " +
      state.layer + (t ? ", position " + absolutePosition(step, t, state.pos) : "");
    document.body.dataset.step = String(state.step);
    document.body.dataset.layer = String(state.layer);
    document.body.dataset.position = String(state.pos);
  }

  function selectStep(i) {
    if (i < 0 || i >= STEPS.length) return;
    state.step = i;
    state.pos = Math.max(positionsOf(STEPS[i]) - 1, 0);
    renderStepDetail();
    renderLayerTable();
    renderPositionSelect();
    renderRoutingDetail();
    updateNormChart();
    updateHeatmap();
    updateBytes();
    renderSelection();
  }

  function selectLayer(L) {
    state.layer = L;
    for (const tr of document.getElementById("layer-table").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.dataset.layer === String(L));
    }
    renderRoutingDetail();
    updateHeatmap();
    updateBytes();
    renderSelection();
  }

  function selectPosition(p) {
    state.pos = p;
    renderLayerTable();
    renderPositionSelect();
    renderRoutingDetail();
    updateHeatmap();
    renderSelection();
  }

  function selectNormField(field) {
    state.normField = field;
    updateNormChart();
  }

  // -- start -------------------------------------------------------------------------------------

  function start() {
    renderSequenceSelect();
    renderHeadline();
    renderTimeline();
    badge("topk-badge", ["steps[].top_k"]);
    makeNormChart();
    makeHeatmap();
    makeBytesChart();
    renderBytesTable();
    document.getElementById("position-select").addEventListener("change", (e) => selectPosition(Number(e.target.value)));
    for (const radio of document.querySelectorAll('input[name="norm-field"]')) {
      radio.addEventListener("change", (e) => selectNormField(e.target.value));
    }
    selectStep(0);
    // the public surface tests and the benchmark use
    window.explorer = { selectStep, selectLayer, selectPosition, selectNormField, state, charts, provOf, sequence: SEQUENCE };
    window.__explorerRendered = performance.now();
    requestAnimationFrame(() => {
      window.__explorerReady = performance.now();
      document.body.dataset.ready = "1";
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
