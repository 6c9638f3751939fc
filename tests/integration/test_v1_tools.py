"""Function calling through /v1, via nginx: the options and tool messages
reach the model as sent, a tool-call answer comes back in OpenAI's shape
(whole and streamed as fragments, parallel calls and index-0 providers
included), finish_reason is the model's, and the limits are 400s."""

import json

import pytest

from test_openai import completions, openai_error, user

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
CALLS = [{"id": "call_a", "name": "get_weather",
          "arguments": json.dumps({"city": "Paris"})},
         {"id": "call_b", "name": "get_weather",
          "arguments": json.dumps({"city": "Zürich, \"CH\""})}]


def with_tools(**extra):
    return dict(user("What is the weather in Paris and Zürich?"),
                tools=[TOOL], **extra)


def sent(model):
    """The last request body the model got."""
    return model.stats()["recent"][-1]["body"]


def chunks(r):
    """The data of each event of a /v1 stream, [DONE] last."""
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.split("\n")
            if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data
    return [json.loads(d) for d in data[:-1]]


def reassemble(events):
    """Tool calls rebuilt from delta fragments, as an OpenAI client does."""
    calls = {}
    for e in events:
        for choice in e["choices"]:
            for frag in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(frag["index"], {
                    "id": None, "name": "", "arguments": ""})
                if "id" in frag:
                    assert frag["type"] == "function", frag
                    call["id"] = frag["id"]
                fn = frag["function"]
                call["name"] += fn.get("name", "")
                call["arguments"] += fn["arguments"]
    return [calls[i] for i in sorted(calls)]


def finish_reasons(events):
    return [c["finish_reason"] for e in events for c in e["choices"]
            if c["finish_reason"] is not None]


def test_options_reach_the_model_as_sent(http, stack, model):
    body = with_tools(tool_choice={"type": "function",
                                   "function": {"name": "get_weather"}},
                      parallel_tool_calls=False,
                      response_format={"type": "json_object"},
                      stop=["\n\n", "END"], seed=42, top_p=0.25,
                      presence_penalty=0.5, frequency_penalty=-0.5,
                      user="u-7", logit_bias={"1": 2})
    r = completions(http, stack, body)
    assert r.status_code == 200, r.text
    got = sent(model)
    for key in ("tools", "tool_choice", "parallel_tool_calls",
                "response_format", "stop", "seed", "top_p",
                "presence_penalty", "frequency_penalty", "user"):
        assert got[key] == body[key], key
    assert "logit_bias" not in got  # unknown fields are still dropped


def test_a_tool_exchange_in_messages_is_forwarded(http, stack, model):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": "{\"city\":\"Paris\"}"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1",
                 "content": "{\"sky\":\"clear\"}"}]
    r = completions(http, stack, {"messages": messages, "tools": [TOOL]})
    assert r.status_code == 200, r.text
    got = sent(model)["messages"]
    assert got[-2] == {"role": "assistant", "content": None,
                       "tool_calls": [call]}
    assert got[-1] == messages[-1]
    assert "sky" in r.json()["choices"][0]["message"]["content"]


def test_tool_calls_answered_whole(http, stack, model):
    model.set(tool_calls=CALLS)
    r = completions(http, stack, with_tools())
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in CALLS]


@pytest.mark.parametrize("index_zero", [False, True],
                         ids=["indexed", "every-call-index-0"])
@pytest.mark.parametrize("upstream", ["events", "split-bytes"])
def test_tool_calls_streamed_as_fragments(http, stack, model, index_zero,
                                          upstream):
    split = {"split_bytes": 7} if upstream == "split-bytes" else {}
    model.set(tool_calls=CALLS, index_zero=index_zero, **split)
    r = completions(http, stack, with_tools(stream=True), timeout=30)
    events = chunks(r)
    fragments = [f for e in events for c in e["choices"]
                 for f in c["delta"].get("tool_calls", [])]
    # relayed as they came: one chunk per upstream fragment, not one whole
    assert len(fragments) > len(CALLS) * 3, fragments
    assert reassemble(events) == [
        {"id": c["id"], "name": c["name"], "arguments": c["arguments"]}
        for c in CALLS]
    assert [f["index"] for f in fragments if "id" in f] == [0, 1]
    assert finish_reasons(events) == ["tool_calls"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_a_streaming_call_answered_whole_still_streams_the_calls(
        http, stack, model):
    """An upstream that ignores stream: true: each call as one chunk."""
    model.set(tool_calls=CALLS, coalesce=True)
    events = chunks(completions(http, stack, with_tools(stream=True)))
    assert [c["arguments"] for c in reassemble(events)] == \
        [c["arguments"] for c in CALLS]


def test_finish_reason_is_the_models(http, stack, model):
    r = completions(http, stack, user())
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    events = chunks(completions(http, stack, dict(user(), stream=True)))
    assert finish_reasons(events) == ["stop"]


def test_too_many_tool_calls_are_a_bad_answer(http, stack, model):
    model.set(tool_calls=[{"name": f"f{i}", "arguments": "{}"}
                          for i in range(17)])
    r = completions(http, stack, with_tools())
    openai_error(r, 502, "api_error")


@pytest.mark.parametrize("extra, why", [
    ({"tools": [TOOL] * 129}, "128"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_p": 3}, "top_p"),
    ({"seed": "x"}, "seed"),
    ({"user": "u" * 257}, "user"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
])
def test_limits_are_400(http, stack, model, extra, why):
    r = completions(http, stack, dict(user(), **extra))
    err = openai_error(r, 400, "invalid_request_error")
    assert why in err["message"], err
    assert model.stats()["requests"] == 0
