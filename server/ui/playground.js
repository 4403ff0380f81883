// The playground: a streaming chat through /v1/chat/completions (stop aborts the request, and the
// gateway cancels it on the engine), an embeddings tab, and the same request as curl and as
// openai Python code.
import { call, h, json, url } from "./api.js";

const $ = (id) => document.getElementById(id);

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

// Events of a text/event-stream body as they arrive: yields each "data:" payload.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

export class Playground {
  constructor() {
    this.messages = [];
    this.epoch = 0; // bumped by clear
    this.controller = null;
    this.tab = "chat";
    this.modelKey = { chat: "", embed: "" };
  }

  start() {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => this.showTab(tab));
    }
    $("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); this.send(); });
    $("chat-input").addEventListener("keydown", (ev) => {
      // Enter sends, but not while an input method is composing a character.
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); this.send(); }
    });
    $("chat-stop").addEventListener("click", () => this.stop());
    $("chat-clear").addEventListener("click", () => {
      this.epoch += 1; // an answer still streaming no longer joins the conversation
      this.stop();
      this.messages = [];
      this.lastBody = null;
      $("transcript").replaceChildren();
      $("chat-stats").textContent = "";
      this.showCode();
    });
    $("embed-form").addEventListener("submit", (ev) => { ev.preventDefault(); this.embed(); });
    for (const id of ["chat-model", "max-tokens", "temperature", "chat-input", "embed-model", "embed-input"]) {
      $(id).addEventListener("input", () => this.showCode());
    }
    $("copy-curl").addEventListener("click", () => this.copy("code-curl", "copy-curl"));
    $("copy-python").addEventListener("click", () => this.copy("code-python", "copy-python"));
    this.showCode();
  }

  showTab(tab) {
    for (const t of document.querySelectorAll(".tab")) {
      t.classList.toggle("active", t === tab);
      $(t.dataset.pane).hidden = t !== tab;
    }
    this.tab = tab.id === "tab-embed" ? "embed" : "chat";
    this.showCode();
  }

  setModels(models) {
    const fill = (select, names, kind) => {
      const key = names.join("\n");
      if (this.modelKey[kind] === key) return;
      this.modelKey[kind] = key;
      const keep = select.value;
      select.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
      if (names.includes(keep)) select.value = keep;
      this.showCode();
    };
    fill($("chat-model"), models.filter((m) => m.task !== "embed").map((m) => m.id), "chat");
    fill($("embed-model"), models.filter((m) => m.task === "embed").map((m) => m.id), "embed");
  }

  chatBody(prompt) {
    const messages = [...this.messages, { role: "user", content: prompt }];
    return {
      model: $("chat-model").value, messages, stream: true, stream_options: { include_usage: true },
      max_tokens: $("max-tokens").value === "" ? undefined : Number($("max-tokens").value),
      temperature: $("temperature").value === "" ? undefined : Number($("temperature").value),
    };
  }

  embedBody() {
    return { model: $("embed-model").value, input: $("embed-input").value };
  }

  showCode() {
    const chat = this.tab === "chat";
    const route = chat ? "chat/completions" : "embeddings";
    const typed = $("chat-input").value;
    // What the box holds, else the request last sent, else an example.
    const body = chat ? (typed || !this.lastBody ? this.chatBody(typed || "Hello") : this.lastBody)
      : { ...this.embedBody(), input: $("embed-input").value || "Hello" };
    const base = url("v1");
    $("code-curl").textContent = [
      `curl -s${chat ? "N" : ""} ${base}/${route} \\`,
      `  -H "Content-Type: application/json" \\`,
      `  -H "Authorization: Bearer $VRAMGATE_API_KEY" \\`,
      `  -d ${shellQuote(JSON.stringify(body))}`,
    ].join("\n");
    const client = [
      "import os",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(base)},`,
      `                api_key=os.environ.get("VRAMGATE_API_KEY", "unused"))`,
    ];
    const call = chat ? [
      "stream = client.chat.completions.create(",
      `    model=${JSON.stringify(body.model)},`,
      `    messages=${JSON.stringify(body.messages)},`,
      body.max_tokens !== undefined ? `    max_tokens=${body.max_tokens},` : null,
      body.temperature !== undefined ? `    temperature=${body.temperature},` : null,
      "    stream=True,",
      ")",
      "for chunk in stream:",
      "    if chunk.choices and chunk.choices[0].delta.content:",
      '        print(chunk.choices[0].delta.content, end="", flush=True)',
      "print()",
    ] : [
      `out = client.embeddings.create(model=${JSON.stringify(body.model)}, input=${JSON.stringify(body.input)})`,
      "vector = out.data[0].embedding",
      "print(len(vector), sum(x * x for x in vector) ** 0.5)",
    ];
    $("code-python").textContent = [...client, "", ...call.filter((l) => l !== null)].join("\n");
  }

  async copy(preId, buttonId) {
    const text = $(preId).textContent;
    try {
      await navigator.clipboard.writeText(text);
      $(buttonId).textContent = "copied";
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents($(preId));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      $(buttonId).textContent = "selected: press Ctrl+C";
    }
    setTimeout(() => { $(buttonId).textContent = "copy"; }, 1500);
  }

  bubble(role, text) {
    const el = h("div", { class: "msg " + role }, h("span", { class: "who" }, role), h("span", { class: "text" }, text));
    $("transcript").append(el);
    $("transcript").scrollTop = $("transcript").scrollHeight;
    return el;
  }

  busy(on) {
    $("chat-send").disabled = on;
    $("chat-stop").disabled = !on;
  }

  // Why the chat form cannot be sent as it is, or "".
  invalid() {
    if (!$("chat-model").value) return "No chat model is available to this key.";
    const max = $("max-tokens").value;
    if (max !== "" && !(Number.isInteger(Number(max)) && Number(max) >= 1)) return "max_tokens must be a whole number, at least 1.";
    const t = $("temperature").value;
    if (t !== "" && !(Number(t) >= 0 && Number(t) <= 2)) return "temperature must be between 0 and 2.";
    return "";
  }

  async send() {
    const prompt = $("chat-input").value.trim();
    if (!prompt || this.controller) return;
    const why = this.invalid();
    if (why) {
      $("chat-stats").textContent = why;
      return;
    }
    const epoch = this.epoch;
    const body = this.chatBody(prompt);
    this.lastBody = body;
    this.bubble("user", prompt);
    const answer = this.bubble("assistant", "");
    const text = answer.querySelector(".text");
    $("chat-input").value = "";
    this.showCode();
    this.controller = new AbortController();
    this.busy(true);
    answer.dataset.status = "streaming";
    const began = performance.now();
    let first = null;
    let pieces = 0;
    let usage = null;
    try {
      const resp = await call("v1/chat/completions", { method: "POST", body, signal: this.controller.signal });
      for await (const data of sseData(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          pieces += 1;
          text.textContent += delta.content;
          $("transcript").scrollTop = $("transcript").scrollHeight;
          $("chat-stats").textContent = `streaming · ${pieces} chunks`;
        }
      }
      answer.dataset.status = "done";
      if (epoch === this.epoch) this.messages.push({ role: "user", content: prompt }, { role: "assistant", content: text.textContent });
      const secs = (performance.now() - began) / 1000;
      const tokens = usage ? usage.completion_tokens : pieces;
      $("chat-stats").textContent = `${tokens} tokens in ${secs.toFixed(1)} s` +
        (first !== null ? ` · TTFT ${((first - began) / 1000).toFixed(2)} s` : "");
    } catch (err) {
      if (err.name === "AbortError") {
        // What came before the stop stays in the conversation, as chat apps keep it.
        if (epoch === this.epoch) this.messages.push({ role: "user", content: prompt }, { role: "assistant", content: text.textContent });
        answer.dataset.status = "stopped";
        text.textContent += " [stopped]";
        if (epoch === this.epoch) $("chat-stats").textContent = `stopped after ${pieces} chunks`;
      } else {
        answer.dataset.status = "failed";
        answer.classList.add("failed");
        text.textContent += (text.textContent ? "\n" : "") + err.message;
        $("chat-stats").textContent = "failed";
      }
    } finally {
      this.controller = null;
      this.busy(false);
    }
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  async embed() {
    const body = this.embedBody();
    this.showCode();
    const out = $("embed-result");
    if (!body.model) {
      out.textContent = "No embedding model is available to this key.";
      return;
    }
    if (!body.input.trim()) {
      out.textContent = "Type some text to embed first.";
      return;
    }
    out.textContent = "embedding…";
    try {
      const data = await json("v1/embeddings", { method: "POST", body });
      const vector = data.data[0].embedding;
      const norm = Math.sqrt(vector.reduce((s, x) => s + x * x, 0));
      out.replaceChildren(
        h("div", { class: "embed-size" }, `size ${vector.length}`),
        h("div", { class: "embed-norm" }, `norm ${norm.toFixed(4)}`),
        h("div", { class: "note" }, "first values: " + vector.slice(0, 8).map((x) => x.toFixed(4)).join(", ") + " …"),
        data.usage ? h("div", { class: "note" }, `${data.usage.prompt_tokens} prompt tokens`) : null);
    } catch (err) {
      out.textContent = "failed: " + err.message;
    }
  }
}
