// The chat page of chatfcgi: one conversation, streamed answers, history
// reloaded from the server. The HTTP contract is shared/API.md: POST
// /api/chat with "stream": true answers Server-Sent Events (delta, done,
// error); GET /api/chat/{id} is the history; DELETE /api/chat/{id} forgets
// it. Text from the model or the user is only ever set with textContent.
// When the service has client keys on, it answers 401 until the page sends
// "Authorization: Bearer <key>": the page then asks for the key once and
// keeps it in localStorage, beside the session id.
"use strict";

(function () {
  const API = "/api/chat";
  const STORE_KEY = "chatfcgi.session_id";
  const SESSION_RE = /^[A-Za-z0-9_-]{1,128}$/;
  const KEY_STORE = "chatfcgi.client_key";
  // What a header value can carry, and no more than the service reads.
  const KEY_RE = /^[\x21-\x7e]{1,512}$/;
  const MAX_MESSAGE_BYTES = 32768;      // the service's max_message_bytes
  const HISTORY_TIMEOUT_MS = 15000;
  const STICK_PX = 48;                  // "at the bottom" tolerance

  const conversation = document.getElementById("conversation");
  const empty = document.getElementById("empty");
  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const send = document.getElementById("send");
  const newChat = document.getElementById("new-chat");
  const status = document.getElementById("status");
  const keyForm = document.getElementById("key-form");
  const keyInput = document.getElementById("key");

  let sessionId = loadSessionId();
  let clientKey = loadClientKey();
  let busy = false;
  let controller = null;                // aborts the running request

  // ------------------------------------------------------------ storage

  function loadSessionId() {
    try {
      const id = window.localStorage.getItem(STORE_KEY);
      return id && SESSION_RE.test(id) ? id : null;
    } catch (e) {
      return null;                      // storage disabled: no memory
    }
  }

  function saveSessionId(id) {
    sessionId = id && SESSION_RE.test(id) ? id : null;
    try {
      if (sessionId) window.localStorage.setItem(STORE_KEY, sessionId);
      else window.localStorage.removeItem(STORE_KEY);
    } catch (e) {
      // storage disabled: the conversation lasts as long as the page
    }
  }

  function loadClientKey() {
    try {
      const key = window.localStorage.getItem(KEY_STORE);
      return key && KEY_RE.test(key) ? key : null;
    } catch (e) {
      return null;
    }
  }

  function saveClientKey(key) {
    clientKey = key;
    try {
      window.localStorage.setItem(KEY_STORE, key);
    } catch (e) {
      // storage disabled: the key lasts as long as the page
    }
  }

  // Headers for the API: extra, and the client key when there is one.
  function apiHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (clientKey) headers.Authorization = "Bearer " + clientKey;
    return headers;
  }

  // ---------------------------------------------------------- rendering

  function nearBottom() {
    return conversation.scrollHeight - conversation.scrollTop -
      conversation.clientHeight < STICK_PX;
  }

  function scrollToBottom() {
    conversation.scrollTop = conversation.scrollHeight;
  }

  // One message: a visually hidden "You said" / "Assistant said" for
  // screen readers, then the text. Returns the element holding the text.
  function addMessage(role, text) {
    empty.hidden = true;
    const item = document.createElement("div");
    item.className = "msg " + (role === "user" ? "user" : "assistant");
    const who = document.createElement("span");
    who.className = "visually-hidden";
    who.textContent = role === "user" ? "You said: " : "Assistant said: ";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    conversation.append(item);
    return body;
  }

  function addTyping(textEl) {
    const dots = document.createElement("span");
    dots.className = "typing";
    dots.setAttribute("aria-hidden", "true");
    for (let i = 0; i < 3; i++) dots.append(document.createElement("span"));
    textEl.parentNode.append(dots);
    return dots;
  }

  function addNotice(text, kind) {
    empty.hidden = true;
    const p = document.createElement("p");
    p.className = "notice " + (kind || "error");
    p.textContent = text;
    const stick = nearBottom();
    conversation.append(p);
    if (stick) scrollToBottom();
    return p;
  }

  function clearConversation() {
    for (const el of Array.from(conversation.children)) {
      if (el !== empty) el.remove();
    }
    empty.hidden = false;
  }

  function setStatus(text) {
    status.textContent = text || "";
  }

  function setBusy(on) {
    busy = on;
    send.disabled = on;
    form.setAttribute("aria-busy", on ? "true" : "false");
    // Screen readers announce the finished answer once, not every delta.
    conversation.setAttribute("aria-busy", on ? "true" : "false");
  }

  // --------------------------------------------------------- error words

  // Retry-After is seconds or an HTTP date; the answer is whole seconds.
  function retryAfterSeconds(value) {
    if (!value) return null;
    if (/^\s*\d+\s*$/.test(value)) return parseInt(value, 10);
    const at = Date.parse(value);
    if (Number.isNaN(at)) return null;
    return Math.max(0, Math.ceil((at - Date.now()) / 1000));
  }

  function duration(seconds) {
    if (seconds <= 1) return "a second";
    if (seconds < 90) return seconds + " seconds";
    const minutes = Math.ceil(seconds / 60);
    return minutes + " minutes";
  }

  const CODE_STATUS = {
    bad_request: 400, unauthorized: 401, not_found: 404, conflict: 409,
    too_large: 413, unsupported_media_type: 415, rate_limited: 429,
    upstream_error: 502, unavailable: 503, upstream_timeout: 504,
  };

  // What went wrong, for a person: status (or the error code of a stream
  // error), the service's own message, Retry-After in seconds.
  function describe(statusCode, code, message, retry) {
    const st = statusCode || CODE_STATUS[code] || 0;
    const wait = retry != null ? retry : null;
    switch (st) {
      case 400:
        return "The chat service could not accept this message" +
          (message ? " (" + message + ")." : ".");
      case 401:
        return clientKey
          ? "The chat service did not accept this access key. Enter " +
            "the right one in the Access key field below, then send " +
            "your message again."
          : "This chat service needs an access key. Enter it in the " +
            "Access key field below, then send your message again " +
            "(whoever runs the service can give you one).";
      case 403:
        return "This chat service needs an access key, and this page " +
          "has none. Ask whoever runs it for access.";
      case 404:
        return "The chat service was not found at this address.";
      case 409:
        return "An earlier answer in this conversation is still being " +
          "written. Wait a moment, then send your message again.";
      case 413:
        return "That message is too long for the chat service. " +
          "Shorten it and send it again.";
      case 415:
        return "The chat service did not understand the request " +
          "(this page may be out of date: reload it).";
      case 429:
        return "You are sending messages too quickly. " +
          (wait != null
            ? "Please wait " + duration(wait) + " before sending again."
            : "Please wait a little before sending again.");
      case 502:
        return "The AI model behind this chat answered with an error. " +
          "Please try again in a moment.";
      case 503:
        return "The chat service is busy or temporarily unavailable. " +
          (wait != null
            ? "Please try again in " + duration(wait) + "."
            : "Please try again in a moment.");
      case 504:
        return "The AI model took too long to answer. Please try again.";
      default:
        if (st >= 500) {
          return "The chat service had a problem (error " + st + "). " +
            "Please try again in a moment.";
        }
        return "The chat service refused the request" +
          (st ? " (error " + st + ")" : "") + ". Please try again.";
    }
  }

  function networkWords() {
    if (navigator.onLine === false) {
      return "You appear to be offline. Check your connection, then " +
        "send your message again.";
    }
    return "Could not reach the chat service. Check your connection " +
      "and try again.";
  }

  // An error answer before any stream: JSON {"error":{code,message}}, or
  // whatever a proxy on the way sent.
  async function httpErrorWords(res) {
    let code = "";
    let message = "";
    try {
      const body = await res.json();
      if (body && body.error && typeof body.error === "object") {
        code = typeof body.error.code === "string" ? body.error.code : "";
        message = typeof body.error.message === "string"
          ? body.error.message : "";
      }
    } catch (e) {
      // not JSON: the status alone says enough
    }
    return describe(res.status, code, message,
      retryAfterSeconds(res.headers.get("Retry-After")));
  }

  // ------------------------------------------------------------ SSE parser

  // Incremental Server-Sent Events parser (the WHATWG event-stream rules):
  // push() text as it arrives, in pieces of any size; onEvent(type, data)
  // runs once per complete event. Lines end with CRLF, LF or CR; comment
  // lines (":...") are skipped; an event left unfinished at the end of the
  // stream is dropped, as a browser's EventSource does.
  function createSseParser(onEvent) {
    let buffer = "";
    let type = "";
    let data = [];
    const EOL = /\r\n|\r|\n/g;

    function dispatch() {
      if (data.length) onEvent(type || "message", data.join("\n"));
      type = "";
      data = [];
    }

    function line(text) {
      if (text === "") return dispatch();
      if (text[0] === ":") return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      // id and retry mean nothing for a POST answer
    }

    function drain(final) {
      let pos = 0;
      EOL.lastIndex = 0;
      let m;
      while ((m = EOL.exec(buffer)) !== null) {
        // A CR at the very end may be the first half of a CRLF.
        if (!final && m[0] === "\r" && m.index === buffer.length - 1) break;
        line(buffer.slice(pos, m.index));
        pos = m.index + m[0].length;
        EOL.lastIndex = pos;
      }
      buffer = buffer.slice(pos);
    }

    return {
      push(text) {
        buffer += text;
        drain(false);
      },
      end() {
        drain(true);
        buffer = "";
        type = "";
        data = [];
      },
    };
  }

  // --------------------------------------------------------------- a turn

  async function sendMessage(text) {
    setBusy(true);
    setStatus("The assistant is answering…");
    const userEl = addMessage("user", text);
    const answerEl = addMessage("assistant", "");
    const answerItem = answerEl.parentNode;
    answerItem.classList.add("pending");
    let typing = addTyping(answerEl);
    scrollToBottom();

    let answer = "";
    let finished = false;               // done received
    let failure = null;                 // words for the person
    let cut = false;                    // an error after text arrived
    const ctl = new AbortController();
    controller = ctl;

    function onEvent(type, data) {
      if (finished || failure) return;
      let obj;
      try {
        obj = JSON.parse(data);
      } catch (e) {
        failure = "The chat service sent an answer this page could not " +
          "read. Please try again.";
        return;
      }
      if (type === "delta") {
        const piece = obj && typeof obj.content === "string" ? obj.content : "";
        if (!piece) return;
        const stick = nearBottom();
        answer += piece;
        answerEl.textContent = answer;
        if (typing) {
          typing.remove();
          typing = null;
        }
        if (stick) scrollToBottom();
      } else if (type === "done") {
        finished = true;
        if (obj && typeof obj.session_id === "string") {
          saveSessionId(obj.session_id);
        }
        if (obj && typeof obj.model === "string" && obj.model) {
          answerItem.dataset.model = obj.model;
        }
      } else if (type === "error") {
        const err = obj && obj.error && typeof obj.error === "object"
          ? obj.error : {};
        failure = describe(0, String(err.code || ""),
          typeof err.message === "string" ? err.message : "", null);
        cut = answer !== "";
      }
    }

    try {
      const body = { message: text, stream: true };
      if (sessionId) body.session_id = sessionId;
      let res;
      try {
        res = await fetch(API, {
          method: "POST",
          headers: apiHeaders({
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
          }),
          body: JSON.stringify(body),
          cache: "no-store",
          signal: ctl.signal,
        });
      } catch (e) {
        if (ctl.signal.aborted) return;
        failure = networkWords();
        return;
      }
      const type = (res.headers.get("Content-Type") || "").toLowerCase();
      if (!res.ok) {
        failure = await httpErrorWords(res);
        if (res.status === 401) askForKey();
        return;
      }
      if (!type.startsWith("text/event-stream")) {
        // A plain JSON answer (a proxy that dropped "stream"): still usable.
        try {
          const obj = await res.json();
          if (obj && typeof obj.reply === "string") {
            onEvent("delta", JSON.stringify({ content: obj.reply }));
            onEvent("done", JSON.stringify(obj));
          }
        } catch (e) {
          // falls through to "could not read"
        }
        if (!finished) {
          failure = "The chat service sent an answer this page could not " +
            "read. Please try again.";
        }
        return;
      }

      const parser = createSseParser(onEvent);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(decoder.decode(value, { stream: true }));
          if (failure) {
            reader.cancel().catch(function () {});
            break;
          }
        }
        parser.push(decoder.decode());
        parser.end();
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (!finished && !failure) {
          failure = "The connection was lost before the answer was " +
            "complete. Please send your message again.";
          cut = answer !== "";
        }
      }
      if (!finished && !failure) {
        failure = "The connection was lost before the answer was " +
          "complete. Please send your message again.";
        cut = answer !== "";
      }
    } finally {
      if (typing) typing.remove();
      answerItem.classList.remove("pending");
      if (controller === ctl) controller = null;
      if (ctl.signal.aborted) {
        // "New chat" while answering: it cleared the conversation and the
        // busy state already, and a new turn may be running.
        return;
      }
      if (failure) {
        // The service keeps no part of a failed turn: say so, and give the
        // message back so that sending again is one key press.
        if (answer === "") answerItem.remove();
        else answerItem.classList.add("incomplete");
        userEl.parentNode.classList.add("failed");
        addNotice((cut ? "The answer was interrupted. " : "") + failure +
          (input.value === "" ? " Your message is back in the box below." : ""));
        if (input.value === "") {
          input.value = text;
          autoGrow();
        }
      }
      setBusy(false);
      setStatus(failure ? "Message not sent." : "");
      const active = document.activeElement;
      if (active === null || active === document.body || active === send) {
        input.focus();
      }
    }
  }

  // ------------------------------------------------------------- history

  async function loadHistory() {
    if (!sessionId) return;
    const id = sessionId;
    setBusy(true);
    setStatus("Loading your conversation…");
    const ctl = new AbortController();
    controller = ctl;
    const timer = setTimeout(function () { ctl.abort(); }, HISTORY_TIMEOUT_MS);
    try {
      let res;
      try {
        res = await fetch(API + "/" + encodeURIComponent(id), {
          headers: apiHeaders({ "Accept": "application/json" }),
          cache: "no-store",
          signal: ctl.signal,
        });
      } catch (e) {
        if (controller !== ctl) return;   // New chat pressed meanwhile
        addNotice("Could not load your earlier conversation. " +
          networkWords());
        return;
      }
      if (res.status === 404) {
        // Expired or deleted: start afresh.
        if (sessionId === id) saveSessionId(null);
        addNotice("Your earlier conversation has expired. " +
          "This is a new one.", "info");
        return;
      }
      if (!res.ok) {
        addNotice("Could not load your earlier conversation. " +
          await httpErrorWords(res));
        if (res.status === 401) askForKey();
        return;
      }
      let body;
      try {
        body = await res.json();
      } catch (e) {
        body = null;
      }
      if (controller !== ctl || sessionId !== id) return;
      const messages = body && Array.isArray(body.messages) ? body.messages : [];
      for (const m of messages) {
        if (!m || typeof m.content !== "string") continue;
        if (m.role === "user" || m.role === "assistant") {
          addMessage(m.role, m.content);
        }
      }
      scrollToBottom();
    } finally {
      clearTimeout(timer);
      if (controller === ctl) {
        controller = null;
        setBusy(false);
        setStatus("");
      }
    }
  }

  // ------------------------------------------------------------ new chat

  function startNewChat() {
    const old = sessionId;
    if (controller) {
      const ctl = controller;
      controller = null;
      ctl.abort();
    }
    saveSessionId(null);
    clearConversation();
    setBusy(false);
    setStatus("Started a new conversation.");
    if (old) {
      // Forget it on the server too; nothing here depends on the answer.
      fetch(API + "/" + encodeURIComponent(old), {
        method: "DELETE", headers: apiHeaders(), keepalive: true,
        cache: "no-store",
      }).catch(function () {});
    }
    input.focus();
  }

  // ---------------------------------------------------------- access key

  // After a 401: the key field, empty (a refused key is not shown back).
  function askForKey() {
    keyInput.value = "";
    keyForm.hidden = false;
    keyInput.focus();
  }

  function submitKey() {
    const key = keyInput.value.trim();
    if (!KEY_RE.test(key)) {
      setStatus("Enter the access key: letters, digits and punctuation, " +
        "without spaces.");
      keyInput.focus();
      return;
    }
    saveClientKey(key);
    keyInput.value = "";
    keyForm.hidden = true;
    setStatus(input.value ? "Access key saved. Send your message again."
      : "Access key saved.");
    input.focus();
    // The history may have been refused for want of the key.
    if (!busy && sessionId && !conversation.querySelector(".msg")) {
      loadHistory();
    }
  }

  // ------------------------------------------------------------- composer

  function autoGrow() {
    input.style.height = "auto";
    input.style.height = input.scrollHeight + 2 + "px";  // CSS caps it
  }

  function submit() {
    if (busy) return;
    const text = input.value.trim();
    if (!text) {
      input.focus();
      return;
    }
    const bytes = new TextEncoder().encode(text).length;
    if (bytes > MAX_MESSAGE_BYTES) {
      addNotice("That message is too long (" + Math.ceil(bytes / 1024) +
        " KB; the limit is " + MAX_MESSAGE_BYTES / 1024 + " KB). " +
        "Shorten it and send it again.");
      input.focus();
      return;
    }
    input.value = "";
    autoGrow();
    input.focus();
    sendMessage(text);
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    submit();
  });

  input.addEventListener("keydown", function (e) {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing ||
        e.keyCode === 229) {
      return;                           // Shift+Enter: a new line
    }
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    e.preventDefault();
    submit();
  });

  input.addEventListener("input", autoGrow);
  newChat.addEventListener("click", startNewChat);
  keyForm.addEventListener("submit", function (e) {
    e.preventDefault();
    submitKey();
  });

  // For the browser test: the parser on its own, without the network.
  window.chatfcgiSse = createSseParser;

  // Focus the box at once, except on touch screens, where that would pop
  // up the keyboard over the history, and when the key field asks first.
  loadHistory().finally(function () {
    if (keyForm.hidden && window.matchMedia &&
        window.matchMedia("(pointer: fine)").matches) {
      input.focus();
    }
  });
})();
