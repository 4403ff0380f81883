"""``relay.until_disconnect``: the hang-up watcher starts only once a request has run
``WATCH_AFTER`` seconds, and a client gone before then is still noticed when it starts."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ClientGone
from server.relay import WATCH_AFTER, until_disconnect


class Client:
    """An ASGI ``receive`` of a client that has hung up; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        return {"type": "http.disconnect"}


async def answer() -> str:
    await asyncio.sleep(0)  # a turn of the loop: a watcher task made at once would run now
    return "answer"


def test_a_request_that_ends_before_the_watch_never_reads_receive():
    async def go():
        client = Client()
        for _ in range(100):
            assert await until_disconnect(answer(), client) == "answer"
        assert client.calls == 0  # no watcher task was made, nor left behind
        assert len(asyncio.all_tasks()) == 1
    asyncio.run(go())


@pytest.mark.parametrize("after", [0.0, WATCH_AFTER])
def test_a_client_gone_before_the_watch_starts_is_noticed_when_it_does(after):
    async def go():
        client, never = Client(), asyncio.get_running_loop().create_future()
        with pytest.raises(ClientGone):
            await until_disconnect(never, client, after=after)
        assert client.calls == 1 and never.cancelled()
    asyncio.run(go())


def test_a_result_that_came_anyway_is_undone():
    """``aw`` swallows the cancellation and finishes: ``cleanup`` gets its result."""
    async def go():
        undone: list[str] = []

        async def stubborn() -> str:
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                pass
            return "lease"
        with pytest.raises(ClientGone):
            await until_disconnect(stubborn(), Client(), undone.append, after=0.0)
        assert undone == ["lease"]
    asyncio.run(go())
