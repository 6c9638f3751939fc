// Browser test of the chat page (app/www), through nginx, with Debian's
// Chromium driven by playwright-core. Run by tests/integration/test_page.py
// against a started stack; by hand:
//
//   CHAT_PAGE_URL=http://127.0.0.1:8080/ CHAT_MODEL_URL=http://127.0.0.1:8081 \
//     node tests/browser/chat.test.mjs
//
// Environment:
//   CHAT_PAGE_URL   the page, served by nginx (required)
//   CHAT_MODEL_URL  the local model, for its /control API (required)
//   CHROMIUM_BIN    the browser (default /usr/bin/chromium)
//   CHAT_OUT_DIR    where screenshots go (default <repo>/tests/out)
//   CHAT_CLIENT_KEY a client key the stack accepts: the stack has client
//                   keys on, and only the access key checks run
//
// Prints one line per check; exits 0 when all pass, 1 at the first failure
// (with a screenshot of the failing page in CHAT_OUT_DIR), 2 on a usage
// error or the overall deadline.

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const PAGE_URL = process.env.CHAT_PAGE_URL;
const MODEL_URL = (process.env.CHAT_MODEL_URL || "").replace(/\/+$/, "");
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const OUT = process.env.CHAT_OUT_DIR || path.join(REPO, "tests", "out");
const CLIENT_KEY = process.env.CHAT_CLIENT_KEY || "";
const DEADLINE_MS = 50000;

const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
  "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync",
  "--no-proxy-server",          // everything is on loopback
];

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 740 };
const SLOW_REPLY = "The quick brown fox jumps over the lazy dog while " +
  "this page shows every word of the answer as soon as it arrives.";
const SECOND_REPLY = "A second answer, to a second question.";
const XSS = "<b>x</b><img src=x onerror=alert(1)>";
const SESSION_RE = /^[A-Za-z0-9_-]{1,128}$/;
const KEY_STORE = "chatfcgi.client_key";

if (!PAGE_URL || !MODEL_URL) {
  console.error("chat.test.mjs: set CHAT_PAGE_URL and CHAT_MODEL_URL");
  process.exit(2);
}

// ------------------------------------------------------------- helpers

async function control(body) {
  const res = await fetch(MODEL_URL + "/control", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 200, "model /control: " + await res.text());
}

async function resetModel() {
  const res = await fetch(MODEL_URL + "/control/reset", { method: "POST" });
  assert.equal(res.status, 200, "model /control/reset");
}

const apiUrl = (p) => new URL(p, PAGE_URL).href;

// What the conversation shows: [{role, text}] for the bubbles, and the
// error/info notices.
function transcript(page) {
  return page.evaluate(() => ({
    messages: Array.from(document.querySelectorAll("#conversation .msg"))
      .map((m) => ({
        role: m.classList.contains("user") ? "user" : "assistant",
        text: m.querySelector(".text").textContent,
      })),
    notices: Array.from(document.querySelectorAll("#conversation .notice"))
      .map((n) => n.textContent),
  }));
}

const busy = (page) => page.evaluate(
  () => document.getElementById("send").disabled);

async function waitIdle(page, timeout = 15000) {
  await page.waitForFunction(
    () => !document.getElementById("send").disabled &&
      document.getElementById("composer").getAttribute("aria-busy") !== "true",
    null, { timeout });
}

// Types a message and sends it with Enter, as a person would.
async function sendByEnter(page, text) {
  await page.locator("#message").fill(text);
  await page.locator("#message").press("Enter");
}

const lastAssistantText = (page) => page.evaluate(() => {
  const all = document.querySelectorAll("#conversation .msg.assistant .text");
  return all.length ? all[all.length - 1].textContent : null;
});

// Watches a page for what must never happen: script errors, CSP
// violations, dialogs (alert() from injected markup).
function watch(page, name, problems) {
  page.on("pageerror", (e) => problems.push(`${name}: script error: ${e.message}`));
  page.on("dialog", async (d) => {
    problems.push(`${name}: a ${d.type()} dialog opened: ${d.message()}`);
    await d.dismiss().catch(() => {});
  });
  page.on("console", (m) => {
    if (m.type() === "error" && /Content Security Policy/i.test(m.text())) {
      problems.push(`${name}: ${m.text()}`);
    }
  });
}

// WCAG contrast ratio of an element's text against the first opaque
// background behind it, computed in the page.
function contrastOf(page, selector, pseudo) {
  return page.evaluate(([sel, ps]) => {
    const el = document.querySelector(sel);
    if (!el) return null;
    const parse = (c) => {
      const m = c.match(/rgba?\(([^)]+)\)/);
      if (!m) return null;
      const p = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
      return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
    };
    const lum = ({ r, g, b }) => {
      const f = (v) => {
        v /= 255;
        return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
      };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const fg = parse(getComputedStyle(el, ps || null).color);
    let bg = null;
    for (let n = el; n; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c && c.a === 1) { bg = c; break; }
    }
    bg = bg || { r: 255, g: 255, b: 255, a: 1 };
    const a = fg.a;   // blend a translucent text colour over its background
    const text = { r: fg.r * a + bg.r * (1 - a), g: fg.g * a + bg.g * (1 - a),
      b: fg.b * a + bg.b * (1 - a) };
    const l1 = lum(text), l2 = lum(bg);
    return (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
  }, [selector, pseudo]);
}

// ------------------------------------------------------ client keys

const keyShown = (page) => page.locator("#key").isVisible();

// The stack has client keys on (CHAT_CLIENT_KEY is one): a 401 brings up
// the access key field; the key, once entered, is kept in localStorage and
// sent as "Authorization: Bearer" by every request.
async function keyChecks(page, problems) {
  const auth = [];
  page.on("request", (r) => {
    if (new URL(r.url()).pathname.startsWith("/api/chat")) {
      auth.push(`${r.method()} ${r.headers().authorization || "-"}`);
    }
  });

  await check("keys on: a message without a key asks for one (401)", async () => {
    await page.goto(PAGE_URL, { waitUntil: "load" });
    await waitIdle(page);
    assert.equal(await keyShown(page), false, "the key field shows before a 401");
    await control({ reply: SECOND_REPLY });
    await sendByEnter(page, "Hello with a key");
    await waitIdle(page);
    assert.ok(await keyShown(page), "no access key field after a 401");
    const t = await transcript(page);
    assert.match(t.notices[t.notices.length - 1] || "", /needs an access key/);
    assert.equal(await page.locator("#message").inputValue(), "Hello with a key");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "key");
    for (const [sel, pseudo] of [["label[for=key]", null], ["#key", null],
      ["#key-save", null], ["#key-hint", null]]) {
      const ratio = await contrastOf(page, sel, pseudo);
      assert.ok(ratio >= 4.5, `${sel}: contrast ${ratio}`);
    }
    await page.screenshot({ path: path.join(OUT, "chat-key.png") });
  });

  await check("after the key is entered, the page chats with it", async () => {
    await page.locator("#key").fill(CLIENT_KEY);
    await page.locator("#key").press("Enter");
    assert.equal(await keyShown(page), false, "the key field stays after saving");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "message");
    await page.locator("#message").press("Enter");
    await waitIdle(page);
    const t = await transcript(page);
    assert.deepEqual(t.messages.slice(-2), [
      { role: "user", text: "Hello with a key" },
      { role: "assistant", text: SECOND_REPLY },
    ]);
    assert.equal(await page.evaluate((k) => localStorage.getItem(k), KEY_STORE),
      CLIENT_KEY);
    assert.equal(auth[auth.length - 1], `POST Bearer ${CLIENT_KEY}`);
  });

  await check("the key is remembered: history after a reload (GET)", async () => {
    await page.reload({ waitUntil: "load" });
    await page.waitForFunction(
      () => document.querySelectorAll("#conversation .msg").length >= 2);
    await waitIdle(page);
    assert.deepEqual((await transcript(page)).notices, []);
    assert.equal(await keyShown(page), false);
    assert.equal(auth[auth.length - 1], `GET Bearer ${CLIENT_KEY}`);
  });

  await check("New chat deletes the session with the key (DELETE)", async () => {
    const sid = await page.evaluate(() => localStorage.getItem("chatfcgi.session_id"));
    assert.match(sid || "", SESSION_RE);
    await page.locator("#new-chat").click();
    let status = 0;
    for (let i = 0; i < 40 && status !== 404; i++) {
      await new Promise((r) => setTimeout(r, 50));
      status = (await fetch(apiUrl("/api/chat/" + sid), {
        headers: { Authorization: `Bearer ${CLIENT_KEY}` } })).status;
    }
    assert.equal(status, 404, "the old session still exists on the server");
    assert.ok(auth.includes(`DELETE Bearer ${CLIENT_KEY}`), auth.join("; "));
  });

  await check("a wrong key is refused in words and can be replaced", async () => {
    await page.evaluate((k) => localStorage.setItem(k, "not-the-key"), KEY_STORE);
    await page.reload({ waitUntil: "load" });
    await waitIdle(page);
    await sendByEnter(page, "Try a wrong key");
    await waitIdle(page);
    assert.ok(await keyShown(page), "no access key field after a wrong key");
    const t = await transcript(page);
    assert.match(t.notices[t.notices.length - 1] || "", /did not accept/);
    await page.locator("#key").fill(CLIENT_KEY);
    await page.locator("#key-save").click();
    await page.locator("#message").press("Enter");
    await waitIdle(page);
    assert.equal(await lastAssistantText(page), SECOND_REPLY);
  });

  await check("no script errors, CSP violations or dialogs", async () => {
    assert.deepEqual(problems, []);
  });
  return 0;
}

// ----------------------------------------------------------------- run

let current = null;           // the page a failure screenshot shows
let step = "";

async function check(name, fn) {
  step = name;
  const t0 = Date.now();
  await fn();
  console.log(`ok   ${name} (${Date.now() - t0} ms)`);
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const profile = mkdtempSync(path.join(tmpdir(), "chatfcgi-chromium-"));
  const problems = [];
  let context = null;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: DESKTOP,
      timeout: 20000,
    });
    context.setDefaultTimeout(10000);
    const page = context.pages()[0] || await context.newPage();
    current = page;
    watch(page, "desktop", problems);
    await resetModel();
    if (CLIENT_KEY) return await keyChecks(page, problems);

    await check("the page loads: label, live region, focus in the box", async () => {
      const res = await page.goto(PAGE_URL, { waitUntil: "load" });
      assert.equal(res.status(), 200);
      await waitIdle(page);
      const a = await page.evaluate(() => ({
        label: document.querySelector('label[for="message"]')?.textContent.trim(),
        live: document.getElementById("conversation").getAttribute("aria-live"),
        lang: document.documentElement.lang,
        focus: document.activeElement?.id,
        css: getComputedStyle(document.querySelector(".bar")).display,
        keyShown: document.getElementById("key")?.offsetParent != null,
      }));
      assert.equal(a.label, "Message");
      assert.equal(a.live, "polite");
      assert.equal(a.lang, "en");
      assert.equal(a.css, "flex", "style.css did not apply (CSP or MIME type?)");
      assert.equal(a.focus, "message", "the message box has no focus on load");
      assert.equal(a.keyShown, false, "an access key field without client keys");
      const t = await transcript(page);
      assert.equal(t.messages.length, 0, "a fresh browser shows no history");
    });

    await check("Shift+Enter makes a new line and sends nothing", async () => {
      const box = page.locator("#message");
      await box.fill("");
      await box.pressSequentially("line one");
      await box.press("Shift+Enter");
      await box.pressSequentially("line two");
      assert.equal(await box.inputValue(), "line one\nline two");
      assert.equal((await transcript(page)).messages.length, 0);
      await box.fill("");
    });

    let first;
    await check("the first answer streams into the page as it arrives", async () => {
      await control({ reply: SLOW_REPLY, chunk_delay_ms: 150 });
      await sendByEnter(page, "Hello, who are you?");
      assert.equal(await busy(page), true, "send is not disabled during a turn");
      assert.equal(await page.evaluate(() => document.activeElement?.id),
        "message", "focus did not return to the message box");
      assert.equal(await page.locator("#message").inputValue(), "");
      const samples = [];
      const t0 = Date.now();
      while (await busy(page)) {
        const text = await lastAssistantText(page);
        if (text) samples.push(text);
        if (Date.now() - t0 > 15000) throw new Error("the turn never ended");
        await page.waitForTimeout(60);
      }
      const final = await lastAssistantText(page);
      assert.equal(final, SLOW_REPLY);
      const distinct = [...new Set(samples)].filter((s) => s !== final);
      assert.ok(distinct.length >= 2,
        `saw ${distinct.length} partial texts while streaming: ` +
        JSON.stringify(distinct));
      for (let i = 1; i < samples.length; i++) {
        assert.ok(samples[i].startsWith(samples[i - 1]),
          "the text did not only grow: " + JSON.stringify(samples.slice(i - 1, i + 1)));
      }
      for (const s of samples) assert.ok(final.startsWith(s));
      first = distinct.length;
      const sid = await page.evaluate(() => localStorage.getItem("chatfcgi.session_id"));
      assert.match(sid || "", SESSION_RE, "no session id in localStorage");
    });
    console.log(`     (${first} partial texts seen while the answer streamed)`);

    let before;
    await check("a second message continues the conversation", async () => {
      const sid = await page.evaluate(() => localStorage.getItem("chatfcgi.session_id"));
      await control({ reply: SECOND_REPLY });
      await page.locator("#message").fill("And what can you do?");
      await page.locator("#send").click();           // the button works too
      assert.equal(await page.evaluate(() => document.activeElement?.id), "message");
      await waitIdle(page);
      before = await transcript(page);
      assert.deepEqual(before.messages, [
        { role: "user", text: "Hello, who are you?" },
        { role: "assistant", text: SLOW_REPLY },
        { role: "user", text: "And what can you do?" },
        { role: "assistant", text: SECOND_REPLY },
      ]);
      assert.deepEqual(before.notices, []);
      assert.equal(await page.evaluate(() => localStorage.getItem("chatfcgi.session_id")),
        sid, "the session id changed within one conversation");
    });

    await check("after a reload the page shows the history (GET)", async () => {
      await page.reload({ waitUntil: "load" });
      await page.waitForFunction(
        () => document.querySelectorAll("#conversation .msg").length >= 4);
      await waitIdle(page);
      const after = await transcript(page);
      assert.deepEqual(after.messages, before.messages);
      assert.deepEqual(after.notices, []);
    });

    await check("model text with markup is shown as literal text", async () => {
      await control({ reply: XSS });
      await sendByEnter(page, "Show me some HTML");
      await waitIdle(page);
      assert.equal(await lastAssistantText(page), XSS);
      const found = await page.evaluate(() => ({
        elements: document.querySelectorAll("#conversation b, #conversation img").length,
        html: Array.from(document.querySelectorAll("#conversation .msg.assistant .text"))
          .pop().innerHTML,
      }));
      assert.equal(found.elements, 0, "markup from the model became elements");
      assert.ok(found.html.startsWith("&lt;b&gt;x&lt;/b&gt;&lt;img"), found.html);
      await page.waitForTimeout(200);   // an onerror would have fired by now
    });

    await check("a model failure is explained in words, message kept", async () => {
      await control({ mode: "fail", status: 500 });
      const n = (await transcript(page)).messages.length;
      await sendByEnter(page, "This one will fail");
      await waitIdle(page);
      const t = await transcript(page);
      const notice = t.notices[t.notices.length - 1] || "";
      assert.match(notice, /AI model behind this chat answered with an error/);
      assert.doesNotMatch(notice, /upstream_error|[{}]|\b502\b/,
        "the error is shown in codes, not words");
      // The user's bubble stays (marked), no empty assistant bubble.
      assert.equal(t.messages.length, n + 1);
      assert.equal(t.messages[n].role, "user");
      assert.equal(await page.locator("#message").inputValue(), "This one will fail",
        "the failed message was not given back");
      assert.equal(await page.evaluate(() => document.activeElement?.id), "message");
      await resetModel();
    });

    await check("focus outlines are visible; colours meet WCAG AA", async () => {
      const ring = await page.evaluate(() => {
        const s = getComputedStyle(document.getElementById("message"));
        return { style: s.outlineStyle, width: parseFloat(s.outlineWidth) };
      });
      assert.notEqual(ring.style, "none", "the focused box has no outline");
      assert.ok(ring.width >= 2, "outline thinner than 2px");
      await page.keyboard.press("Tab");         // to the Send button
      const btn = await page.evaluate(() => {
        const el = document.activeElement;
        const s = getComputedStyle(el);
        return { id: el.id, style: s.outlineStyle, width: parseFloat(s.outlineWidth) };
      });
      assert.equal(btn.id, "send");
      assert.notEqual(btn.style, "none", "the focused button has no outline");
      assert.ok(btn.width >= 2);
      await page.locator("#message").focus();
      for (const scheme of ["light", "dark"]) {
        await page.emulateMedia({ colorScheme: scheme });
        for (const [sel, pseudo] of [
          ["body", null], [".title", null], [".hint", null], [".status", null],
          ["#message", "::placeholder"], ["#send", null], ["#new-chat", null],
          ["#conversation .msg.user .text", null],
          ["#conversation .msg.assistant .text", null],
          ["#conversation .notice", null],
        ]) {
          const ratio = await contrastOf(page, sel, pseudo);
          assert.ok(ratio !== null, `${sel} not found`);
          assert.ok(ratio >= 4.5,
            `${scheme}: ${sel}${pseudo || ""}: contrast ${ratio.toFixed(2)} < 4.5`);
        }
        if (scheme === "dark") {
          await page.screenshot({ path: path.join(OUT, "chat-desktop-dark.png") });
        }
      }
      await page.emulateMedia({ colorScheme: "light" });
    });

    await check("desktop screenshot", async () => {
      await page.locator("#message").fill("");
      await page.screenshot({ path: path.join(OUT, "chat-desktop.png") });
    });

    const phone = await context.newPage();
    current = phone;
    watch(phone, "phone", problems);
    await check("375x740 phone: history, no horizontal scroll", async () => {
      await phone.setViewportSize(PHONE);
      await phone.goto(PAGE_URL, { waitUntil: "load" });
      await phone.waitForFunction(
        () => document.querySelectorAll("#conversation .msg").length >= 6);
      await waitIdle(phone);
      // A long unbroken word must wrap, not widen the page.
      await control({ reply: "Here: " + "x".repeat(300) + " and " +
        "https://example.org/" + "very-long-path/".repeat(20) });
      await sendByEnter(phone, "Send me something very long");
      await waitIdle(phone);
      const m = await phone.evaluate(() => {
        const doc = document.documentElement;
        const right = Math.max(...Array.from(
          document.querySelectorAll("body *")).map((e) => e.getBoundingClientRect().right));
        const box = (id) => {
          const r = document.getElementById(id).getBoundingClientRect();
          return { left: r.left, right: r.right, top: r.top, bottom: r.bottom };
        };
        return {
          scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
          bodyScroll: document.body.scrollWidth, right,
          inner: window.innerWidth, innerH: window.innerHeight,
          send: box("send"), input: box("message"), newChat: box("new-chat"),
        };
      });
      assert.equal(m.inner, 375);
      assert.ok(m.scrollWidth <= m.clientWidth,
        `horizontal scroll: page ${m.scrollWidth}px wide in ${m.clientWidth}px`);
      assert.ok(m.bodyScroll <= m.clientWidth, `body ${m.bodyScroll}px wide`);
      assert.ok(m.right <= 375.5, `an element reaches x=${m.right}`);
      for (const [name, r] of Object.entries({ send: m.send, input: m.input,
        newChat: m.newChat })) {
        assert.ok(r.left >= 0 && r.right <= 375 && r.top >= 0 && r.bottom <= m.innerH,
          `${name} is not fully on screen: ${JSON.stringify(r)}`);
      }
      assert.ok(m.send.right - m.send.left >= 44 && m.send.bottom - m.send.top >= 44,
        "the Send button is smaller than a 44px touch target");
      await resetModel();
      await phone.evaluate(() => {
        document.getElementById("conversation").scrollTop = 0;
      });
      await phone.screenshot({ path: path.join(OUT, "chat-phone.png") });
    });

    await check("errors in words: 429 Retry-After, 503, 504, network down, cut stream", async () => {
      const cases = [
        { name: "429", fulfill: { status: 429, headers: { "Retry-After": "7" },
          contentType: "application/json",
          body: '{"error":{"code":"rate_limited","message":"slow down"}}' },
          words: /sending messages too quickly\. Please wait 7 seconds/ },
        { name: "503", fulfill: { status: 503, headers: { "Retry-After": "2" },
          contentType: "application/json",
          body: '{"error":{"code":"unavailable","message":"busy"}}' },
          words: /busy or temporarily unavailable\. Please try again in 2 seconds/ },
        { name: "502 html", fulfill: { status: 502, contentType: "text/html",
          body: "<html>Bad Gateway</html>" },
          words: /AI model behind this chat answered with an error/ },
        { name: "504", fulfill: { status: 504, contentType: "application/json",
          body: '{"error":{"code":"upstream_timeout","message":"timeout"}}' },
          words: /took too long to answer/ },
        { name: "network", abort: "connectionrefused",
          words: /Could not reach the chat service/ },
        { name: "stream error", fulfill: { status: 200,
          contentType: "text/event-stream",
          body: ': comment\r\nevent: delta\r\ndata: {"content":"Half an"}\r\n\r\n' +
            'event: error\ndata: {"error":{"code":"upstream_error",' +
            '"message":"x"}}\n\n' },
          words: /^The answer was interrupted\. The AI model/ },
        { name: "stream cut", fulfill: { status: 200,
          contentType: "text/event-stream",
          body: 'event: delta\ndata: {"content":"Half"}\n\n' },
          words: /connection was lost before the answer was complete/ },
      ];
      for (const c of cases) {
        await phone.route("**/api/chat", (route) => c.abort
          ? route.abort(c.abort) : route.fulfill(c.fulfill));
        await sendByEnter(phone, "mocked " + c.name);
        await waitIdle(phone);
        await phone.unroute("**/api/chat");
        const t = await transcript(phone);
        const notice = t.notices[t.notices.length - 1] || "";
        assert.match(notice, c.words, `${c.name}: ${notice}`);
        await phone.locator("#message").fill("");
      }
    });

    await check("the SSE parser takes events split at any byte", async () => {
      const stream = ": hello\r\n\r\nevent: delta\r\ndata: {\"content\":\"a\"}\r\n\r\n" +
        "event: delta\rdata: {\"content\":\"b\\nc\"}\r\r" +
        "event: delta\ndata:{\"content\":\"é€😀\"}\n\n" +
        "data: line1\ndata: line2\n\n" +
        "event: done\ndata: {\"session_id\":\"s\"}\n\nevent: delta\ndata: {\"content\":\"lost\"}";
      const results = await phone.evaluate((s) => {
        const out = [];
        for (let cut = 0; cut <= s.length; cut++) {
          const got = [];
          const p = window.chatfcgiSse((type, data) => got.push([type, data]));
          p.push(s.slice(0, cut));
          p.push(s.slice(cut));
          p.end();
          out.push(JSON.stringify(got));
        }
        return out;
      }, stream);
      const want = JSON.stringify([
        ["delta", '{"content":"a"}'], ["delta", '{"content":"b\\nc"}'],
        ["delta", '{"content":"é€😀"}'], ["message", "line1\nline2"],
        ["done", '{"session_id":"s"}'],
      ]);
      results.forEach((r, i) => assert.equal(r, want, `split at ${i}`));
    });

    await check("New chat forgets the session and deletes it (DELETE)", async () => {
      current = page;
      await phone.close();
      await page.bringToFront();
      const sid = await page.evaluate(() => localStorage.getItem("chatfcgi.session_id"));
      assert.match(sid || "", SESSION_RE);
      await page.locator("#new-chat").click();
      const after = await page.evaluate(() => ({
        sid: localStorage.getItem("chatfcgi.session_id"),
        msgs: document.querySelectorAll("#conversation .msg, #conversation .notice").length,
        empty: !document.getElementById("empty").hidden,
        focus: document.activeElement?.id,
      }));
      assert.deepEqual(after, { sid: null, msgs: 0, empty: true, focus: "message" });
      let status = 0;
      for (let i = 0; i < 40; i++) {
        status = (await fetch(apiUrl("/api/chat/" + sid))).status;
        if (status === 404) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(status, 404, "the old session still exists on the server");
      await page.reload({ waitUntil: "load" });
      await waitIdle(page);
      assert.equal((await transcript(page)).messages.length, 0);
    });

    await check("no script errors, CSP violations or dialogs", async () => {
      assert.deepEqual(problems, []);
    });
    return 0;
  } catch (e) {
    console.log(`FAIL ${step}`);
    console.log(String(e && e.stack || e).split("\n").map((l) => "     " + l).join("\n"));
    if (problems.length) console.log("     also: " + problems.join("\n     also: "));
    if (current && !current.isClosed()) {
      const shot = path.join(OUT, "chat-failure.png");
      await current.screenshot({ path: shot }).catch(() => {});
      console.log(`     screenshot of the failing page: ${shot}`);
    }
    return 1;
  } finally {
    await resetModel().catch(() => {});
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

const t0 = Date.now();
const timer = setTimeout(() => {
  console.log(`FAIL ${step}: the whole test took over ${DEADLINE_MS / 1000} s`);
  process.exit(2);
}, DEADLINE_MS);
const code = await main();
clearTimeout(timer);
console.log(`${code === 0 ? "all checks passed" : "failed"} in ` +
  `${((Date.now() - t0) / 1000).toFixed(1)} s; screenshots in ${OUT}`);
process.exit(code);
