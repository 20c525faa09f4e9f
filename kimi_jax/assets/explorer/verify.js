/* kimi-jax "verify this bundle": the browser checks a bundle's files offline.
 *
 * Drop the bundle's folder or its .tar.gz (kimi-jax archive), or choose either with the inputs.
 * Every file is hashed with BLAKE3 (@noble/hashes, vendored) and compared with CHECKSUMS.b3; the
 * receipt's bundle_digest must be the BLAKE3 of CHECKSUMS.b3; a listed file that is missing, a
 * file whose digest differs and a file present but not listed each fail. Archives are gunzipped
 * with the browser's own DecompressionStream and read by the small tar reader below (regular files
 * and folders only; links and anything else are refused, as kimi-jax's extractor refuses them).
 * Nothing is sent anywhere: the page's Content-Security-Policy forbids every fetch.
 */
(function () {
  const LISTING = "CHECKSUMS.b3";
  const RECEIPT = "receipt.json";
  // Bounds, as kimi_jax.ledger.archive has them: no bundle holds more.
  const MAX_TOTAL_BYTES = 1024 * 1024 * 1024;
  const MAX_MEMBERS = 10000;
  const CHUNK = 1 << 20;

  const $ = (id) => document.getElementById(id);
  const utf8 = new TextDecoder("utf-8", { fatal: false });

  function hex(bytes) {
    let s = "";
    for (const b of bytes) s += b.toString(16).padStart(2, "0");
    return s;
  }

  /** BLAKE3 of a File (streamed in chunks) or a Uint8Array. */
  async function blake3Of(data) {
    const h = nobleHashes.blake3.create();
    if (data instanceof Uint8Array) {
      for (let i = 0; i < data.length; i += CHUNK) h.update(data.subarray(i, i + CHUNK));
    } else {
      const reader = data.stream().getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        h.update(value);
      }
    }
    return hex(h.digest());
  }

  async function bytesOf(data) {
    return data instanceof Uint8Array ? data : new Uint8Array(await data.arrayBuffer());
  }

  // -- reading what was dropped ------------------------------------------------------------------

  /** {path relative to the bundle folder: File | Uint8Array} from one folder's files, whose paths
   *  all start with the folder's own name ("demo/ledger.json"). */
  function underOneFolder(pairs, problems) {
    const tops = new Set(pairs.map(([p]) => p.split("/")[0]));
    if (tops.size !== 1) {
      problems.push("expected one bundle folder, found " + tops.size + " top-level entries");
      return null;
    }
    const files = new Map();
    for (const [path, data] of pairs) {
      const rel = path.split("/").slice(1).join("/");
      if (rel) files.set(rel, data);
    }
    return files;
  }

  function readEntries(dirReader) {
    return new Promise((resolve, reject) => dirReader.readEntries(resolve, reject));
  }

  async function walk(entry, prefix, out) {
    if (out.length > MAX_MEMBERS) throw new Error("more than " + MAX_MEMBERS + " files: not a bundle");
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push([prefix + entry.name, file]);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await readEntries(reader);
        if (!batch.length) break;
        for (const child of batch) await walk(child, prefix + entry.name + "/", out);
      }
    }
  }

  function field(block, start, length) {
    const raw = block.subarray(start, start + length);
    const end = raw.indexOf(0);
    return utf8.decode(end < 0 ? raw : raw.subarray(0, end));
  }

  function octal(block, start, length) {
    const text = field(block, start, length).trim();
    if (!/^[0-7]*$/.test(text)) throw new Error("tar: malformed size field");
    return text ? parseInt(text, 8) : 0;
  }

  /** Regular files of a tar stream: [[path, Uint8Array]], refusing links and special members. */
  function untar(tar, problems) {
    const pairs = [];
    let offset = 0;
    let longName = null;
    while (offset + 512 <= tar.length) {
      const block = tar.subarray(offset, offset + 512);
      if (block.every((b) => b === 0)) break;
      const size = octal(block, 124, 12);
      const type = String.fromCharCode(block[156] || 48);
      const start = offset + 512;
      if (start + size > tar.length) throw new Error("tar: member runs past the end of the archive");
      const body = tar.subarray(start, start + size);
      offset = start + Math.ceil(size / 512) * 512;
      const prefix = field(block, 345, 155);
      let name = longName || (prefix ? prefix + "/" : "") + field(block, 0, 100);
      longName = null;
      if (type === "x") {  // pax extended header: a "path" record names the next member
        for (const record of utf8.decode(body).split("\n")) {
          const m = /^\d+ path=(.*)$/.exec(record);
          if (m) longName = m[1];
        }
        continue;
      }
      if (type === "g") continue;
      if (type === "L") {  // GNU long name
        longName = utf8.decode(body).replace(/\0+$/, "");
        continue;
      }
      name = name.replace(/\/+$/, "");
      if (name.startsWith("/") || name.split("/").some((p) => p === ".." || p === ".")) {
        problems.push(name + ": unsafe path in the archive");
        continue;
      }
      if (type === "5") continue;
      if (type !== "0" && type !== "\0" && type !== "7") {
        problems.push(name + ": not a regular file or folder (tar type " + JSON.stringify(type) + ")");
        continue;
      }
      if (pairs.length >= MAX_MEMBERS) throw new Error("more than " + MAX_MEMBERS + " members: not a bundle");
      pairs.push([name, body]);
    }
    return pairs;
  }

  async function gunzip(file) {
    const stream = file.stream().pipeThrough(new DecompressionStream("gzip"));
    const reader = stream.getReader();
    const parts = [];
    let total = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > MAX_TOTAL_BYTES) throw new Error("the archive expands past " + MAX_TOTAL_BYTES + " bytes: not a bundle");
      parts.push(value);
    }
    const out = new Uint8Array(total);
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  async function fromArchive(file, problems) {
    const pairs = untar(await gunzip(file), problems);
    return underOneFolder(pairs, problems);
  }

  // -- checking ----------------------------------------------------------------------------------

  function unescapePath(text) {
    let out = "";
    for (let i = 0; i < text.length; i++) {
      if (text[i] !== "\\") { out += text[i]; continue; }
      const next = text[++i];
      if (next === "\\") out += "\\";
      else if (next === "n") out += "\n";
      else if (next === "r") out += "\r";
      else return null;
    }
    return out;
  }

  /** {path: digest} and problems, as kimi_jax.ledger.checksums.parse_checksums reads the listing. */
  function parseListing(text, problems) {
    const listed = new Map();
    text.split("\n").forEach((raw, n) => {
      if (raw === "") return;
      let line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      const escaped = line.startsWith("\\");
      const m = /^([0-9a-f]{64})  (.+)$/.exec(escaped ? line.slice(1) : line);
      const path = m ? (escaped ? unescapePath(m[2]) : m[2]) : null;
      if (!m || path === null) { problems.push(LISTING + ":" + (n + 1) + ": malformed line"); return; }
      if (path.startsWith("/") || path.split("/").some((p) => p === "" || p === "." || p === "..")) {
        problems.push(LISTING + ":" + (n + 1) + ": " + path + ": not a plain relative path");
        return;
      }
      if (listed.has(path)) { problems.push(LISTING + ":" + (n + 1) + ": " + path + ": listed twice"); return; }
      listed.set(path, m[1]);
    });
    return listed;
  }

  /** The outcome for a bundle's files: {ok, rows: [{path, status, detail}], problems, certification}. */
  async function verifyFiles(files, problems, progress) {
    const rows = [];
    const add = (path, status, detail) => rows.push({ path, status, detail: detail || "" });
    if (!files) return { ok: false, rows, problems };
    if (!files.has(LISTING)) problems.push(LISTING + ": missing; nothing to verify against");
    if (!files.has(RECEIPT)) problems.push(RECEIPT + ": missing");
    if (problems.length) return { ok: false, rows, problems };
    const listingBytes = await bytesOf(files.get(LISTING));
    const listed = parseListing(utf8.decode(listingBytes), problems);
    let receipt = null;
    try {
      receipt = JSON.parse(utf8.decode(await bytesOf(files.get(RECEIPT))));
    } catch (e) {
      problems.push(RECEIPT + ": not JSON (" + e.message + ")");
    }
    const listingDigest = await blake3Of(listingBytes);
    if (receipt && receipt.bundle_digest !== listingDigest) {
      problems.push(RECEIPT + ": bundle_digest " + String(receipt.bundle_digest).slice(0, 16) + "... is not BLAKE3(" +
        LISTING + ") " + listingDigest.slice(0, 16) + "...");
      add(RECEIPT, "FAILED", "bundle_digest is not the BLAKE3 of " + LISTING);
    } else if (receipt) {
      add(RECEIPT, "OK", "bundle_digest = BLAKE3(" + LISTING + ") = " + listingDigest);
    }
    let done = 0;
    for (const [path, want] of [...listed.entries()].sort()) {
      progress(++done, listed.size);
      if (!files.has(path)) { add(path, "MISSING", "listed in " + LISTING + " but not in the bundle"); continue; }
      const have = await blake3Of(files.get(path));
      if (have === want) add(path, "OK", have);
      else add(path, "CHANGED", "BLAKE3 " + have.slice(0, 16) + "..., " + LISTING + " lists " + want.slice(0, 16) + "...");
    }
    for (const path of [...files.keys()].sort()) {
      if (path !== LISTING && path !== RECEIPT && !listed.has(path)) add(path, "UNLISTED", "present but not listed in " + LISTING);
    }
    let certification = null;
    let sameLedger;
    const intact = (name) => rows.some((r) => r.path === name && r.status === "OK");
    if (intact("ledger.json") && receipt && receipt.verdict) {
      const ledger = JSON.parse(utf8.decode(await bytesOf(files.get("ledger.json"))));
      // a multi-sequence ledger's verdict lists each sequence's tokens (kimi_jax.ledger.bundle.receipt_verdict)
      const tokens = ledger.sequences ? ledger.sequences.map((q) => (q.steps || []).map((s) => s.token))
        : (ledger.steps || []).map((s) => s.token);
      if (JSON.stringify(tokens) !== JSON.stringify(receipt.verdict.tokens)) {
        problems.push(RECEIPT + ": verdict.tokens differ from ledger.json's tokens");
      }
      const shown = JSON.parse(document.getElementById("ledger-data").textContent);
      sameLedger = JSON.stringify(shown) === JSON.stringify(ledger);
    }
    if (intact("certification.json")) {
      certification = JSON.parse(utf8.decode(await bytesOf(files.get("certification.json"))));
    }
    const ok = !problems.length && rows.every((r) => r.status === "OK");
    return { ok, rows, problems, certification, sameLedger };
  }

  // -- showing -----------------------------------------------------------------------------------

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function show(result, source) {
    const status = $("verify-status");
    const bad = result.rows.filter((r) => r.status !== "OK");
    status.dataset.result = result.ok ? "ok" : "fail";
    status.className = "verify-status " + (result.ok ? "verify-ok" : "verify-fail");
    const files = result.rows.filter((r) => r.path !== RECEIPT).length;
    status.textContent = result.ok
      ? "VERIFIED: " + source + ": " + files + " files match " + LISTING + ", and the receipt's bundle_digest is its BLAKE3."
      : "NOT VERIFIED: " + source + ": " + [...result.problems, ...bad.map((r) => r.path + ": " + r.status)].join("; ");
    const same = $("verify-same");
    same.hidden = result.sameLedger === undefined;
    same.textContent = result.sameLedger ? "Its ledger.json is the ledger this page shows."
      : "Its ledger.json is not the ledger this page shows: this is another bundle.";
    const tbody = $("verify-table").tBodies[0];
    tbody.textContent = "";
    for (const r of result.rows) {
      const tr = document.createElement("tr");
      tr.dataset.status = r.status;
      cell(tr, r.path, "mono");
      cell(tr, r.status, r.status === "OK" ? "verify-ok" : "verify-fail");
      cell(tr, r.detail, "mono");
      tbody.appendChild(tr);
    }
    const box = $("verify-certification");
    const cert = result.ok && result.certification && Array.isArray(result.certification.rows) ? result.certification : null;
    box.hidden = !cert;
    const body = $("certification-table").tBodies[0];
    body.textContent = "";
    for (const row of cert ? cert.rows : []) {
      const tr = document.createElement("tr");
      cell(tr, String(row.label));
      cell(tr, String(row.result));
      cell(tr, String(row.check) + ": " + String(row.status) + (row.detail ? ": " + String(row.detail) : ""));
      body.appendChild(tr);
    }
  }

  async function run(read, source) {
    const status = $("verify-status");
    status.dataset.result = "running";
    status.className = "verify-status";
    status.textContent = "reading " + source + "...";
    const problems = [];
    let result;
    try {
      const files = await read(problems);
      result = await verifyFiles(files, problems, (n, total) => { status.textContent = "hashing " + n + " of " + total + "..."; });
    } catch (e) {
      problems.push(String(e && e.message ? e.message : e));
      result = { ok: false, rows: [], problems };
    }
    show(result, source);
  }

  function isArchive(file) {
    return /\.(tar\.gz|tgz|gz)$/i.test(file.name);
  }

  function start() {
    $("verify-folder").addEventListener("change", (e) => {
      const list = [...e.target.files];
      if (!list.length) return;
      const top = list[0].webkitRelativePath.split("/")[0];
      run(async (problems) => underOneFolder(list.map((f) => [f.webkitRelativePath, f]), problems), top + "/");
    });
    $("verify-archive").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) run((problems) => fromArchive(file, problems), file.name);
    });
    const zone = $("verify-drop");
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const items = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
      const files = [...e.dataTransfer.files];
      if (items.length === 1 && items[0].isDirectory) {
        run(async (problems) => { const out = []; await walk(items[0], "", out); return underOneFolder(out, problems); },
          items[0].name + "/");
      } else if (files.length === 1 && isArchive(files[0])) {
        run((problems) => fromArchive(files[0], problems), files[0].name);
      } else {
        run(async (problems) => { problems.push("drop one bundle folder or one .tar.gz"); return null; }, "the drop");
      }
    });
    window.bundleVerifier = { verifyFiles, untar, gunzip };
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
