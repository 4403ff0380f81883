import json

from server.sse import EventSplitter, error_event, with_null_usage


def test_splitter_keeps_bytes_and_waits_for_whole_events():
    s = EventSplitter()
    assert s.feed(b'data: {"a":') == []
    assert s.feed(b'1}\n\ndata: [DO') == [b'data: {"a":1}\n\n']
    assert s.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]
    assert s.rest() == b""


def test_splitter_cuts_at_every_blank_line_however_the_reads_fall():
    """LF and CRLF event ends, a separator cut anywhere by the reads, events of a few bytes and of
    megabytes (searched once, where each read used to search the whole event again): the same
    events as cutting the whole stream at once."""
    import random
    import re

    rng = random.Random(7)
    ends = [b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n"]
    for trial in range(300):
        big = trial % 50 == 0
        events = [b"data: " + (b"x" * (2_000_000 if big and i == 1 else rng.randrange(0, 40)))
                  + rng.choice([b"", b"\r", b"\n"]) + rng.choice(ends) for i in range(rng.randrange(1, 8))]
        stream = b"".join(events) + rng.choice([b"", b"data: half", b"\r\n\r"])
        want, last = [], 0
        for m in re.finditer(rb"\r?\n\r?\n", stream):
            want.append(stream[last:m.end()])
            last = m.end()
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(12))))
        if big:
            cuts = sorted(set(cuts) | set(range(65536, len(stream), 65536)))
        s = EventSplitter()
        got = [e for a, b in zip([0, *cuts], [*cuts, len(stream)]) for e in s.feed(stream[a:b])]
        assert got == want and s.rest() == stream[last:] and s.pending == len(stream) - last


def test_null_usage_added_only_where_missing():
    assert with_null_usage(b'data: {"a":1}\n\n') == b'data: {"a":1,"usage":null}\n\n'
    # written with spaces, by a server that is not vLLM: still the chunk's own key
    assert with_null_usage(b'data: {"a":1, "usage": null}\n\n') == b'data: {"a":1, "usage": null}\n\n'
    # the token "usage" as a top_logprobs key is no usage key (a break-it pass)
    token = b'data: {"choices":[{"logprobs":{"top_logprobs":[{"usage":-0.5}]}}]}\n\n'
    assert with_null_usage(token) == token[:-3] + b',"usage":null}\n\n'
    with_usage = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert with_null_usage(with_usage) == with_usage
    assert with_null_usage(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert with_null_usage(b": keep-alive\n\n") == b": keep-alive\n\n"
    out = with_null_usage(b'data: {"choices":[{"delta":{"content":"}"}}]}\n\n')
    assert json.loads(out[6:])["usage"] is None


def test_error_event_is_one_openai_error():
    ev = error_event("boom", code="engine_stream_failed")
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert json.loads(ev[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                            "code": "engine_stream_failed"}}


def test_stream_flavors_know_their_last_event_and_error_shape():
    from server.sse import ANTHROPIC, OPENAI, RESPONSES
    assert OPENAI.complete(b"data: [DONE]\n\n") and not OPENAI.complete(b'data: {"a":1}\n\n')
    done = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
    assert RESPONSES.complete(done) and not RESPONSES.complete(b'event: response.output_text.delta\n'
                                                               b'data: {"type":"x"}\n\n')
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert ANTHROPIC.complete(stop) and not ANTHROPIC.complete(b"event: ping\ndata: {}\n\n")
    for flavor in (RESPONSES, ANTHROPIC):
        ev = flavor.error("boom", "engine_stream_failed")
        assert ev.startswith(b"event: error\ndata: ") and ev.endswith(b"\n\n")
        body = json.loads(ev.split(b"data: ", 1)[1])
        assert body["type"] == "error"
    assert json.loads(ANTHROPIC.error("boom", "x").split(b"data: ", 1)[1])["error"]["message"] == "boom"
    assert json.loads(RESPONSES.error("boom", "x").split(b"data: ", 1)[1])["code"] == "x"


CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
USAGE = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"total_tokens":10,'
         b'"completion_tokens":3}}\n\n')


def test_tap_drops_the_usage_chunk_it_asked_for_and_counts_it():
    """C01: the gateway's own usage request never reaches a client that did not ask."""
    from server.sse import DONE, OPENAI, StreamTap
    tap = StreamTap(OPENAI, drop_usage=True)
    assert tap.feed([CHUNK % b"a"], 1.0) == [CHUNK % b"a"]
    assert tap.feed([CHUNK % b"b", CHUNK % b"c"], 1.5) == [CHUNK % b"b", CHUNK % b"c"]
    assert tap.feed([USAGE], 1.6) == []
    assert tap.feed([DONE], 1.7) == [DONE]
    assert tap.tokens == {"prompt": 7, "completion": 3}
    assert tap.gaps == [0.5, 0.0]  # from the first token; DONE and usage are not tokens


def test_tap_keeps_the_usage_chunk_a_client_asked_for():
    from server.sse import DONE, OPENAI, StreamTap
    tap = StreamTap(OPENAI, null_usage=True)
    out = tap.feed([CHUNK % b"a", USAGE, DONE], 2.0)
    assert out[0].endswith(b',"usage":null}\n\n') and out[1:] == [USAGE, DONE]
    assert tap.tokens == {"prompt": 7, "completion": 3}


def test_tap_keeps_continuous_usage_chunks_and_reads_other_flavors():
    from server.sse import ANTHROPIC, OPENAI, StreamTap
    cont = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n'
    tap = StreamTap(OPENAI, drop_usage=True)
    assert tap.feed([cont], 0.0) == [cont]  # a token chunk that carries usage is never dropped
    start = b'event: message_start\ndata: {"message":{"usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
    delta = b'event: content_block_delta\ndata: {"delta":{"text":"hi"}}\n\n'
    end = b'event: message_delta\ndata: {"delta":{},"usage":{"output_tokens":4}}\n\n'
    tap = StreamTap(ANTHROPIC, drop_usage=True)
    assert tap.feed([start, delta], 1.0) == [start, delta]
    assert tap.feed([end], 1.25) == [end]
    assert tap.tokens == {"prompt": 9, "completion": 4} and tap.gaps == [0.25]


def test_tap_reads_usage_written_with_spaces():
    """Engines other than vLLM may write JSON with spaces; the usage chunk is still found."""
    from server.sse import DONE, OPENAI, StreamTap
    spaced = b'data: {"choices": [ ], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}\n\n'
    tap = StreamTap(OPENAI, drop_usage=True)
    assert tap.feed([CHUNK % b"a", spaced, DONE], 0.0) == [CHUNK % b"a", DONE]
    assert tap.tokens == {"prompt": 2, "completion": 5}


def test_a_token_usage_after_the_usage_object_is_not_taken_for_it():
    """Logprobs after ``usage`` may hold the token "usage": as a string value or as a key of
    ``top_logprobs``. The counts still come from the usage object (a break-it pass saw them lost)."""
    from server.sse import answer_usage
    usage = b'"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}'
    for after in (b'"prompt_logprobs":[null,{"1234":{"logprob":-1.0,"decoded_token":"usage"}}]',
                  b'"logprobs":{"top_logprobs":[{"usage": -0.5,"x":-1.0}]}',
                  b'"x":"usage","y":["usage"]'):
        body = b'{"choices":[{"text":"a"}],' + usage + b"," + after + b"}"
        assert answer_usage(body) == {"prompt": 5, "completion": 2}, after
    assert answer_usage(b'{"choices":[{"text":"usage"}]}') == {}


def test_answer_usage_is_found_wherever_it_is():
    """vLLM can put prompt_logprobs or token ids after usage: a long tail must not hide it."""
    from server.sse import answer_usage
    body = (b'{"choices":[{"message":{"content":"say \\"usage\\": {\\"prompt_tokens\\": 99}"}}],'
            b'"usage":{"prompt_tokens":7,"completion_tokens":2},"prompt_logprobs":[' + b"0.5," * 5000 + b'0.5]}')
    assert answer_usage(body) == {"prompt": 7, "completion": 2}
    assert answer_usage(b'{"data":[]}') == {}


def test_an_upstreams_model_name_becomes_ours_and_nothing_else_changes():
    from server.sse import ModelRename
    rename = ModelRename("their/name", "far")
    chunk = (b'data: {"id":"c1","model":"their/name","choices":[{"delta":{"content":'
             b'"{\\"model\\": \\"their/name\\"}"}}]}\n\n')
    out = rename(chunk)
    assert out.startswith(b'data: {"id":"c1","model":"far",')
    assert b'\\"model\\": \\"their/name\\"' in out  # text inside a string stays as it was
    assert rename(b'{"type": "message", "model" : "their/name"}') == b'{"type": "message", "model" : "far"}'
    assert rename(b'{"model":"their/name-2"}') == b'{"model":"their/name-2"}'


def _reference(tap, reads):
    """What the tap did before ``feed_bytes``: the splitter's events through ``feed``."""
    splitter, out, last = EventSplitter(), [], b""
    for now, read in enumerate(reads):
        events = splitter.feed(read)
        if events:
            last = events[-1]
            out += tap.feed(events, float(now))
    return b"".join(out), last


# Events no vLLM writes, where a shortcut could go wrong: a JSON that is no object, one over two
# data lines, a named event, trailing spaces, a "}" before a line break inside the data.
ODD = [b'data: "}"\n\n', b'data: {"a":\ndata: 1}\n\n', b'event: x\ndata: {"a":1}\n\n',
       b'data: {"a":1} \n\n', b'data: {"error":{"message":"}"}}\n\n', b'data: {"a":{}}\n\n']


def test_feed_bytes_forwards_and_counts_what_the_splitter_and_feed_would():
    """The fast path (whole OpenAI events, nothing to change) and the split path give the same
    bytes, gaps, tokens, end and last event, however the engine's reads are cut."""
    import random

    from server.sse import ANTHROPIC, DONE, OPENAI, ModelRename, StreamTap
    rng = random.Random(15)
    delta = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{}}\n\n'
    for trial in range(2000):
        flavor = OPENAI if trial % 4 else ANTHROPIC
        continuous = (b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'  # vLLM's
                      b'"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n' % trial)
        events = [ROLE] if rng.random() < 0.5 else []
        events += [rng.choice([CHUNK % b"a", CHUNK % b"b\\n\\n", b": keep-alive\n\n", delta,
                               continuous, *ODD]) for _ in range(rng.randrange(1, 12))]
        events += [USAGE] if rng.random() < 0.5 else []
        events += [rng.choice([DONE, b"data:[DONE]\n\n"])] if rng.random() < 0.7 else []
        stream = b"".join(events)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(6))))
        if rng.random() < 0.5:  # most engines' reads end at an event's end
            ends = [i + 2 for i in range(len(stream)) if stream[i:i + 2] == b"\n\n"]
            cuts = sorted(set(rng.sample(ends, min(len(ends), 3))) - {len(stream)})
        reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        options = dict(null_usage=rng.random() < 0.5, drop_usage=rng.random() < 0.5)
        rename = ModelRename("theirs", "ours") if rng.random() < 0.2 else None
        fast, slow = StreamTap(flavor, **options), StreamTap(flavor, **options)
        fast.rename = slow.rename = rename
        got = b"".join(fast.feed_bytes(read, float(now)) for now, read in enumerate(reads))
        want, last = _reference(slow, reads)
        assert got == want
        assert (fast.gaps, fast.tokens, fast.finished) == (slow.gaps, slow.tokens, slow.finished)
        assert flavor.complete(fast.last_event) == flavor.complete(last)
        assert fast.rest() == b""


def test_feed_bytes_holds_an_event_cut_short():
    from server.sse import DONE, OPENAI, StreamTap
    tap = StreamTap(OPENAI)
    assert tap.feed_bytes((CHUNK % b"a")[:10], 1.0) == b""
    assert tap.feed_bytes((CHUNK % b"a")[10:] + DONE, 2.0) == CHUNK % b"a" + DONE
    assert tap.finished and OPENAI.complete(tap.last_event)
    assert tap.feed_bytes(b"data: {", 3.0) == b"" and tap.rest() == b"data: {"


ROLE = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
        b'{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n')


def test_vllms_role_only_first_chunk_is_no_token_gap():
    """vLLM opens a chat stream with the role and no text: the gaps start at the first token."""
    from server.sse import DONE, OPENAI, StreamTap
    for reads in ([ROLE + CHUNK % b"a", CHUNK % b"b", DONE], [ROLE, CHUNK % b"a", CHUNK % b"b" + DONE]):
        tap = StreamTap(OPENAI)
        out = b"".join(tap.feed_bytes(read, float(t)) for t, read in enumerate(reads))
        assert out == b"".join(reads) and tap.finished
        assert len(tap.gaps) == 1  # two tokens, one gap between them


def test_a_read_of_thousands_of_usage_events_is_one_pass():
    """An upstream that puts ``"usage":null`` in every chunk, read in one go (a backlog): no
    recursion per event (a break-it pass had 1,000 such events raise RecursionError)."""
    from server.sse import DONE, OPENAI, StreamTap
    event = b'data: {"choices":[{"index":0,"delta":{"content":"w"}}],"usage":null}\n\n'
    tap = StreamTap(OPENAI, drop_usage=True)
    read = event * 5000 + DONE
    assert tap.feed_bytes(read, 1.0) == read
    assert tap.finished and len(tap.gaps) == 4999 and set(tap.gaps) == {0.0}
