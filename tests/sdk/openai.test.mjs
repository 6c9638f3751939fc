// The official openai npm package against chatfcgi's /v1 face: a plain
// completion, a streamed one, and an error. Run by tests/integration/
// test_openai.py with CHATFCGI_BASE_URL=http://127.0.0.1:PORT/v1.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.CHATFCGI_BASE_URL,
  apiKey: process.env.CHATFCGI_CLIENT_KEY || "unused",
  maxRetries: 0,
  timeout: 15000,
});

// The model the server offers first (a model it does not offer is a 400).
const model = (await client.models.list()).data[0].id;

async function plain() {
  const r = await client.chat.completions.create({
    model,
    messages: [
      { role: "system", content: "You are a test." },
      { role: "user", content: "I feel tired today" },
    ],
  });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices[0].message.role, "assistant");
  assert.ok(r.choices[0].message.content.length > 0);
  assert.ok(r.usage.total_tokens > 0);
  return r.choices[0].message.content;
}

async function streamed(expected) {
  const stream = await client.chat.completions.create({
    model,
    stream: true,
    stream_options: { include_usage: true },
    messages: [
      { role: "system", content: "You are a test." },
      { role: "user", content: "I feel tired today" },
    ],
  });
  let text = "";
  let chunks = 0;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) text += choice.delta.content ?? "";
    chunks++;
  }
  assert.equal(text, expected, "streamed text equals the plain answer");
  assert.ok(chunks > 2, `several chunks (${chunks})`);
  assert.ok(usage && usage.completion_tokens > 0, "a usage chunk");
}

async function error() {
  await assert.rejects(
    client.chat.completions.create({ model, messages: [] }),
    (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, String(e));
      assert.equal(e.status, 400);
      assert.equal(e.error.type, "invalid_request_error");
      return true;
    },
  );
}

async function models() {
  const list = await client.models.list();
  assert.ok(list.data.length === 1 && list.data[0].id, "one model");
}

// Function calling as the SDK's users write it: the bundled model calls
// get_time when it is offered and asked for the time; the client runs it
// and sends the result back; the model answers from it.
const tools = [{
  type: "function",
  function: {
    name: "get_time",
    description: "the current time in UTC",
    parameters: { type: "object", properties: {} },
  },
}];
const question = [{ role: "user", content: "What time is it?" }];
const TOOL_RESULT = '{"utc":"2030-01-01T00:00:00Z"}';

async function answerTheCall(message) {
  const call = message.tool_calls[0];
  assert.equal(call.type, "function");
  assert.equal(call.function.name, "get_time");
  assert.deepEqual(JSON.parse(call.function.arguments), {});
  const r = await client.chat.completions.create({
    model,
    tools,
    messages: [...question, message,
      { role: "tool", tool_call_id: call.id, content: TOOL_RESULT }],
  });
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.ok(r.choices[0].message.content.includes(TOOL_RESULT),
    r.choices[0].message.content);
}

async function toolsPlain() {
  const r = await client.chat.completions.create({
    model, tools, messages: question,
  });
  assert.equal(r.choices[0].finish_reason, "tool_calls");
  assert.equal(r.choices[0].message.content, null);
  await answerTheCall(r.choices[0].message);
}

async function toolsStreamed() {
  // The SDK's own helper reassembles the streamed fragments.
  const runner = client.beta.chat.completions.stream({
    model, tools, messages: question,
  });
  const done = await runner.finalChatCompletion();
  assert.equal(done.choices[0].finish_reason, "tool_calls");
  const message = done.choices[0].message;
  assert.equal(message.tool_calls.length, 1);
  await answerTheCall({ role: "assistant", content: null,
    tool_calls: message.tool_calls });
}

const reply = await plain();
await streamed(reply);
await error();
await models();
await toolsPlain();
await toolsStreamed();
console.log("openai sdk: plain, stream, error, models and tools passed");
